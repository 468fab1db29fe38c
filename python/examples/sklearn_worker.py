#!/usr/bin/env python3
"""A switchyard model worker around a real scikit-learn model.

At start it trains a logistic regression (standardised features) on the Wisconsin breast-cancer data set
that scikit-learn ships (load_breast_cancer: 569 rows, 30 features; 75% to train, 25% held out, the held-out
accuracy is logged), then serves it with switchyard_worker: each request is answered with the model's
probability of class 1 ("benign") as plain text with four decimals, e.g. "0.9731" — what switchyard's
quality scoring reads with `score: plain`.

From payload to features (`features()` below), first rule that applies:
  1. a JSON object with "features": a list of 30 numbers, in the order of
     load_breast_cancer().feature_names -> that row;
  2. a JSON object with "features": an object of feature name -> number ({"mean radius": 17.9, ...}) ->
     the training set's mean row with those values put in; an unknown name is an error;
  3. anything else — what `switchyard loadgen` sends ({"amount":4711,"n":17}), or any bytes — stands for
     one of the data set's own rows, chosen by the payload's hash: row = first 8 bytes of
     SHA-256(payload), big-endian, mod 569. The same payload always gets the same answer.
A payload whose "features" is malformed (wrong length, not numbers, unknown names) is answered with an
error (status MODEL_ERROR in the decision); the rest of its batch is answered normally.

    python sklearn_worker.py --model churn-v2
    SWITCHYARD_BOOTSTRAP_SERVERS=kafka:9092 SWITCHYARD_WORKER_METRICS_PORT=9101 python sklearn_worker.py --model m

Configuration beyond the flags: the environment, as for switchyard (see python/README.md).
"""

import argparse
import hashlib
import json
import logging

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from switchyard_worker import serve

log = logging.getLogger("sklearn_worker")


class BreastCancerModel:
    """The trained model and the payload-to-features mapping."""

    def __init__(self):
        data = load_breast_cancer()
        self.rows = data.data
        self.names = list(data.feature_names)
        x_train, x_test, y_train, y_test = train_test_split(
            data.data, data.target, test_size=0.25, random_state=0, stratify=data.target)
        self.model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        self.model.fit(x_train, y_train)
        self.mean_row = x_train.mean(axis=0)
        self.test_accuracy = float(self.model.score(x_test, y_test))

    def features(self, payload: bytes) -> np.ndarray:
        """The feature row a payload stands for (rules in the module docstring); ValueError if malformed."""
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if isinstance(doc, dict) and "features" in doc:
            given = doc["features"]
            if isinstance(given, list):
                if len(given) != len(self.names):
                    raise ValueError(f"features: {len(given)} values, expected {len(self.names)}")
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in given):
                    raise ValueError("features: every value must be a number")
                return np.asarray(given, dtype=float)
            if isinstance(given, dict):
                row = self.mean_row.copy()
                for name, value in given.items():
                    if name not in self.names:
                        raise ValueError(f"features: unknown feature {name!r}")
                    if not isinstance(value, (int, float)) or isinstance(value, bool):
                        raise ValueError(f"features: {name!r} must be a number")
                    row[self.names.index(name)] = value
                return row
            raise ValueError("features: expected a list of numbers or an object of name -> number")
        return self.rows[self.row_of(payload)]

    def row_of(self, payload: bytes) -> int:
        """Rule 3: the data set row a payload without features stands for."""
        return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") % len(self.rows)

    def predict_batch(self, requests):
        """One answer per request: the probability of class 1 as text, or a ValueError."""
        answers, rows = [], []
        for request in requests:
            try:
                rows.append(self.features(request["payload"]))
                answers.append(None)
            except ValueError as e:
                answers.append(e)
        probabilities = iter(self.model.predict_proba(np.vstack(rows))[:, 1] if rows else [])
        return [answer if answer is not None else f"{next(probabilities):.4f}" for answer in answers]

    def answer(self, payload: bytes) -> str:
        """The answer to one payload (what predict_batch gives it)."""
        result = self.predict_batch([{"payload": payload}])[0]
        if isinstance(result, Exception):
            raise result
        return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="breast-cancer", help="model name (topics model.<name>.requests/.predictions)")
    parser.add_argument("--batch-size", type=int, help="most requests per batch (default 500)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (default 9100; 0: any free port)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    model = BreastCancerModel()
    log.info("trained on load_breast_cancer: held-out accuracy %.3f", model.test_accuracy)
    settings = {k: v for k, v in (("batch_size", args.batch_size), ("metrics_port", args.metrics_port)) if v is not None}
    serve(args.model, predict_batch=model.predict_batch, **settings)


if __name__ == "__main__":
    main()
