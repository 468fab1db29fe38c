//! How a model's output bytes map to a score: configured per deployment, because switchyard never
//! interprets outputs otherwise.

use serde::{Deserialize, Serialize};

/// Where the score is in a model's output.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ScoreFormat {
    /// The whole output is a number as text (`0.8731`): the demo models' format.
    #[default]
    Plain,
    /// The output is a JSON object; the score is this field (`{"score": 0.87, ...}`), a number.
    JsonField(String),
}

/// The `source` of a label by absence: a decision that matured without one, scored with its
/// deployment's `default_label`.
pub const IMPLICIT: &str = "implicit";

/// What the models of a deployment predict, and how their outputs are scored against labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualitySpec {
    #[serde(default)]
    pub task: Task,
    #[serde(default)]
    pub score: ScoreFormat,
    /// Classification: a score at or above it means positive (for the 0/1 loss and accuracy).
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Judge each decision when it matures, this long after it was made: a label that came earlier is
    /// held until then; one that comes later is dead-lettered `late_label` (conversion and chargeback
    /// windows). None: each label is scored when it arrives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maturity_ms: Option<u64>,
    /// With `maturity_ms`: the label of a decision that matures without one (labels by absence: "no
    /// chargeback by day 90" is a 0). None: such a decision counts as unlabelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_label: Option<f64>,
}

fn default_threshold() -> f64 {
    0.5
}

impl Default for QualitySpec {
    fn default() -> Self {
        QualitySpec {
            task: Task::default(),
            score: ScoreFormat::default(),
            threshold: default_threshold(),
            maturity_ms: None,
            default_label: None,
        }
    }
}

impl QualitySpec {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.threshold > 0.0 && self.threshold < 1.0) {
            return Err(format!("quality.threshold must be between 0 and 1 (exclusive), got {}", self.threshold));
        }
        if matches!(&self.score, ScoreFormat::JsonField(f) if f.is_empty()) {
            return Err("quality.score.json_field names no field".into());
        }
        if self.maturity_ms == Some(0) {
            return Err("quality.maturity_ms must be positive (leave it out to score labels as they arrive)".into());
        }
        match self.default_label {
            Some(_) if self.maturity_ms.is_none() => {
                Err("quality.default_label needs quality.maturity_ms: the time after which a missing label means it"
                    .into())
            }
            Some(label) if !label.is_finite() => Err(format!("quality.default_label {label} is not a number")),
            Some(label) if self.task == Task::BinaryClassification && label != 0.0 && label != 1.0 => {
                Err(format!("quality.default_label {label} is neither 0 nor 1 (binary classification)"))
            }
            _ => Ok(()),
        }
    }
}

/// The kind of prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// The output is the probability of the positive class; labels are 0 or 1.
    #[default]
    BinaryClassification,
    /// The output is a number; labels are numbers.
    Regression,
}

/// Why an output gave no score.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScoreError {
    #[error("output is not UTF-8 text")]
    NotText,
    #[error("output {0:?} is not a number")]
    NotANumber(String),
    #[error("output is not a JSON object with a number in field {field:?}: {detail}")]
    Json { field: String, detail: String },
    #[error("score {0} is not a probability in [0, 1]")]
    OutOfRange(f64),
}

impl ScoreFormat {
    /// The score in `output`: any finite number (regression).
    pub fn score(&self, output: &[u8]) -> Result<f64, ScoreError> {
        let value = match self {
            ScoreFormat::Plain => {
                let text = std::str::from_utf8(output).map_err(|_| ScoreError::NotText)?.trim();
                text.parse::<f64>().map_err(|_| ScoreError::NotANumber(text.chars().take(40).collect()))?
            }
            ScoreFormat::JsonField(field) => {
                let json = |detail: String| ScoreError::Json { field: field.clone(), detail };
                let value: serde_json::Value = serde_json::from_slice(output).map_err(|e| json(e.to_string()))?;
                value
                    .get(field)
                    .and_then(serde_json::Value::as_f64)
                    .ok_or_else(|| json("field missing or not a number".into()))?
            }
        };
        if value.is_finite() { Ok(value) } else { Err(ScoreError::NotANumber(value.to_string())) }
    }

    /// The score in `output` as the probability of the positive class.
    pub fn probability(&self, output: &[u8]) -> Result<f64, ScoreError> {
        let p = self.score(output)?;
        if (0.0..=1.0).contains(&p) { Ok(p) } else { Err(ScoreError::OutOfRange(p)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_json_outputs_give_scores_and_bad_ones_say_why() {
        assert_eq!(ScoreFormat::Plain.probability(b"0.8731"), Ok(0.8731));
        assert_eq!(ScoreFormat::Plain.probability(b" 1\n"), Ok(1.0));
        let json = ScoreFormat::JsonField("score".into());
        assert_eq!(json.probability(br#"{"score":0.25,"label":"fraud"}"#), Ok(0.25));
        assert_eq!(json.score(br#"{"score":-3.5}"#), Ok(-3.5), "regression takes any finite number");
        let cases: [(&ScoreFormat, &[u8], &str); 6] = [
            (&ScoreFormat::Plain, b"high", "not a number"),
            (&ScoreFormat::Plain, &[0xff, 0xfe], "not UTF-8"),
            (&ScoreFormat::Plain, b"1.5", "not a probability"),
            (&ScoreFormat::Plain, b"NaN", "not a number"),
            (&json, br#"{"p":0.1}"#, "field missing"),
            (&json, b"0.1 trailing", "JSON object"),
        ];
        for (format, output, reason) in cases {
            let error = format.probability(output).unwrap_err().to_string();
            assert!(error.contains(reason), "{output:?}: {error} lacks {reason:?}");
        }
        let round: ScoreFormat = serde_json::from_str(r#"{"json_field":"score"}"#).unwrap();
        assert_eq!(round, json);
        assert_eq!(serde_json::from_str::<ScoreFormat>(r#""plain""#).unwrap(), ScoreFormat::Plain);
    }
}
