//! route: requests in, per-model requests and one routing record out.
//!
//! For each request: decode, look up its deployment, apply the pure [`cohort::route`] decision, then
//! publish a PRIMARY copy to the serving model's topic, SHADOW copies to the shadow models' topics and a
//! [`Routed`] record (what merge joins the answers to). Anything that cannot be routed is dead-lettered.
//! Each batch and its input offsets are committed in one Kafka transaction, by the stage driver
//! ([`TxnStage::drive`]).

use std::time::Duration;

use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{Message, OwnedMessage};

use crate::clock;
use crate::codec::{Codec, Millis, ModelRequest, ROUTED_SOURCE_HEADER, Request, Role, Routed, routed_source};
use crate::cohort;
use crate::config::Config;
use crate::control::{Registry, SharedRegistry};
use crate::dead_letter::{self, Kind, Letter};
use crate::error::Result;
use crate::kafka::{GroupWatch, OutRecord, Outbox, Output, Stage, TxnStage};
use crate::record::Deployment;
use crate::shutdown::Shutdown;
use crate::telemetry::Event;

/// How long to wait for a request before checking for shutdown.
const IDLE: Duration = Duration::from_millis(200);

/// Everything one request turns into.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub routed: Routed,
    pub copies: Vec<ModelRequest>,
}

/// The routing of one decoded request under its deployment: pure.
pub fn plan(request: Request, deployment: &Deployment, routed_at: Millis) -> Plan {
    let route = cohort::route(deployment, &request.user_id, &request.attributes);
    let version = deployment.version() as i64;
    let routed = Routed {
        request_id: request.request_id.clone(),
        user_id: request.user_id.clone(),
        deployment: request.deployment.clone(),
        strategy: deployment.strategy().as_str().to_string(),
        cohort: route.cohort_label(),
        bucket: i32::from(route.bucket),
        config_version: version,
        serving_model: route.serving.to_string(),
        shadow_models: route.shadows.iter().map(|m| m.to_string()).collect(),
        timeout_ms: deployment.spec.timeout_ms as i64,
        sent_at: request.sent_at,
        routed_at,
        fallback: deployment.spec.fallback.as_ref().map(|f| f.clone().into_bytes()),
        hedge_model: route.hedge.map(str::to_string),
        propensity: route.propensity,
    };
    let copy = |model: &str, role| ModelRequest {
        request: request.clone(),
        model: model.to_string(),
        role,
        config_version: version,
        routed_at,
    };
    let mut copies = vec![copy(route.serving, Role::Primary)];
    copies.extend(route.shadows.iter().map(|m| copy(m, Role::Shadow)));
    Plan { routed, copies }
}

/// Why a request was not routed.
#[derive(Debug, Clone, PartialEq)]
pub struct Unroutable {
    pub kind: Kind,
    pub reason: String,
}

/// Decodes and checks one request value, and finds its deployment.
pub fn admit(
    value: Option<&[u8]>,
    max_bytes: usize,
    codec: &Codec,
    registry: &Registry,
) -> Result<(Request, std::sync::Arc<Deployment>), Unroutable> {
    let value = value.unwrap_or_default();
    if value.len() > max_bytes {
        return Err(Unroutable {
            kind: Kind::Oversized,
            reason: format!("value of {} bytes exceeds service.max_request_bytes = {max_bytes}", value.len()),
        });
    }
    let request: Request =
        codec.decode(value).map_err(|e| Unroutable { kind: Kind::Undecodable, reason: e.to_string() })?;
    if request.request_id.is_empty() {
        return Err(Unroutable { kind: Kind::Invalid, reason: "request_id is empty".into() });
    }
    let deployment = registry.get(&request.deployment);
    match deployment {
        Some(d) => Ok((request, d)),
        None => Err(Unroutable {
            kind: Kind::UnknownDeployment,
            reason: format!("deployment {:?} is not in force", request.deployment),
        }),
    }
}

/// The records a plan is published as; `request` is the value its request was decoded from, at
/// `source` (partition, offset) of the requests topic.
pub fn records(plan: &Plan, request: &[u8], source: (i32, i64), config: &Config, codec: &Codec) -> Vec<OutRecord> {
    let key = plan.routed.user_id.as_bytes();
    let mut out: Vec<OutRecord> = plan
        .copies
        .iter()
        .map(|copy| {
            let value = codec
                .model_request_from(request, &copy.model, copy.role, copy.config_version, copy.routed_at)
                .unwrap_or_else(|| codec.encode(copy));
            OutRecord::new(config.topics.model_requests(&copy.model), key, value)
                .header("role", copy.role.as_str())
                .header("deployment", plan.routed.deployment.as_str())
        })
        .collect();
    out.push(
        OutRecord::new(config.topics.routed.clone(), key, codec.encode(&plan.routed))
            .header(ROUTED_SOURCE_HEADER, routed_source(source.0, source.1)),
    );
    out
}

/// Turns one request into its records (or a dead letter) and the events that count them, each made
/// from the input at `index`.
fn process(
    index: usize,
    message: &OwnedMessage,
    config: &Config,
    codec: &Codec,
    registry: &Registry,
    out: &mut Outbox,
) {
    match admit(message.payload(), config.service.max_request_bytes, codec, registry) {
        Ok((request, deployment)) => {
            let plan = plan(request, &deployment, clock::now_millis());
            out.events.push(Event::Hop { hop: "route", since: plan.routed.sent_at });
            out.events.extend(plan.copies.iter().map(|copy| Event::Routed {
                deployment: plan.routed.deployment.clone(),
                model: copy.model.clone(),
                role: copy.role.as_str(),
            }));
            let value = message.payload().unwrap_or_default();
            let source = (message.partition(), message.offset());
            out.records.extend(records(&plan, value, source, config, codec).into_iter().map(|mut record| {
                record.origin = Some(index);
                record
            }));
        }
        Err(e) => out.push_from(index, Some(Letter::of(message, e.kind, e.reason).record(&config.topics.dead_letter))),
    }
}

/// route's hooks for the stage driver: stateless, one request at a time.
struct Route {
    config: Config,
    codec: Codec,
    registry: SharedRegistry,
}

impl Stage for Route {
    async fn restore(&mut self, _: &StreamConsumer<GroupWatch>) -> Result<()> {
        Ok(()) // nothing kept between batches
    }

    fn feed(&mut self, index: usize, message: &OwnedMessage, out: &mut Outbox) {
        // The deployments in force as this request is routed; the watcher's next update waits for it.
        let registry = self.registry.read().expect("registry lock is never poisoned");
        process(index, message, &self.config, &self.codec, &registry, out);
    }
}

/// Runs route until shutdown. Starts consuming only after `registry` holds the whole deployments topic.
///
/// Each batch's per-model requests are written, then its routing records and dead letters, then the
/// requests' offsets committed (see the module docs).
pub async fn run(config: Config, codec: Codec, registry: SharedRegistry, shutdown: Shutdown) -> Result<()> {
    // What settles a request — its routed record or its dead letter — only once its model requests are
    // written: the routing merge keeps (the first) always has its copies, and a batch that fails (a
    // record refused, route killed) leaves at most model requests behind, not dead letters written twice.
    let output = Output::Idempotent { last: vec![config.topics.routed.clone(), config.topics.dead_letter.clone()] };
    let mut stage = TxnStage::new(&config, "route", &[config.topics.requests.as_str()], output, shutdown)?;
    stage.drive(&mut Route { config, codec, registry }, IDLE, dead_letter::refused).await?;
    stage.close().await;
    tracing::info!("route stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Registry;
    use crate::record::DeploymentSpec;

    fn deployment(json: &str) -> Deployment {
        DeploymentSpec::from_json(json.as_bytes()).unwrap().validate("fraud").unwrap()
    }

    fn request(user: &str) -> Request {
        Request {
            request_id: format!("r-{user}"),
            user_id: user.into(),
            deployment: "fraud".into(),
            sent_at: 10,
            payload: vec![1],
            attributes: Default::default(),
        }
    }

    #[test]
    fn plan_sends_one_primary_and_the_shadows() {
        let d = deployment(
            r#"{"version":3,"strategy":"shadow","control":"v1","candidate":"v2","mirror":["v3"],"timeout_ms":250}"#,
        );
        let p = plan(request("user-1"), &d, 20);
        assert_eq!(p.routed.serving_model, "v1");
        assert_eq!(p.routed.shadow_models, vec!["v2", "v3"]);
        assert_eq!(
            (p.routed.timeout_ms, p.routed.config_version, p.routed.bucket, p.routed.routed_at),
            (250, 3, 9090, 20)
        );
        let roles: Vec<_> = p.copies.iter().map(|c| (c.model.as_str(), c.role)).collect();
        assert_eq!(roles, vec![("v1", Role::Primary), ("v2", Role::Shadow), ("v3", Role::Shadow)]);
        assert!(p.copies.iter().all(|c| c.request == request("user-1") && c.config_version == 3));
    }

    #[test]
    fn admit_sorts_bad_input() {
        let codec = Codec::default();
        let registry = Registry::shared();
        registry.write().unwrap().apply(
            Some(b"fraud"),
            Some(br#"{"version":1,"strategy":"single","control":"v1"}"#),
            0,
        );
        let registry = registry.read().unwrap();
        assert!(admit(Some(&codec.encode(&request("u"))), 1000, &codec, &registry).is_ok());
        let kind = |value: Option<&[u8]>| admit(value, 1000, &codec, &registry).unwrap_err().kind;
        assert_eq!(kind(None), Kind::Undecodable);
        assert_eq!(kind(Some(b"\x01\x02garbage")), Kind::Undecodable);
        let mut other = request("u");
        other.deployment = "nope".into();
        assert_eq!(kind(Some(&codec.encode(&other))), Kind::UnknownDeployment);
        let mut empty_id = request("u");
        empty_id.request_id.clear();
        assert_eq!(kind(Some(&codec.encode(&empty_id))), Kind::Invalid);
        assert_eq!(kind(Some(&vec![0u8; 1001])), Kind::Oversized);
    }
}
