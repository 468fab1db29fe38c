//! `switchyard run`: wires the deployments watcher, route, merge and the metrics endpoint together, and
//! waits for all of them on shutdown.

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::config::Config;
use crate::control::{Registry, watcher};
use crate::error::{Error, Result};
use crate::kafka::TopicKind;
use crate::shutdown::{Shutdown, ShutdownTrigger};
use crate::telemetry::{self, http::Health};
use crate::{kafka, merge, quality, rollout, route};

/// Which halves of the service this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Roles {
    #[default]
    All,
    Route,
    Merge,
}

/// Creates the topics the service reads and writes (per-model topics are created per deployment).
pub async fn ensure_core_topics(config: &Config) -> Result<()> {
    let t = &config.topics;
    let topics =
        [&t.requests, &t.routed, &t.merge_changelog, &t.forwarded_predictions, &t.scored_outcomes, &t.dead_letter]
            .map(|s| s.to_string());
    kafka::ensure_topics(config, &topics, TopicKind::Stream).await?;
    // What the score stage joins must be kept at least as long as its window.
    let joined = [&t.decisions, &t.shadow_comparisons, &t.outcomes].map(|s| s.to_string());
    kafka::ensure_topics(config, &joined, TopicKind::KeptFor(config.quality.window_ms)).await?;
    kafka::ensure_topics(config, std::slice::from_ref(&t.score_changelog), TopicKind::Changelog).await?;
    kafka::ensure_topics(config, std::slice::from_ref(&t.deployments), TopicKind::Compacted).await?;
    kafka::ensure_topics(config, std::slice::from_ref(&t.history), TopicKind::Audit).await?;
    Ok(())
}

/// Runs until `trigger` fires (or a task fails, which triggers it for the others).
pub async fn run(config: Config, roles: Roles, trigger: ShutdownTrigger, shutdown: Shutdown) -> Result<()> {
    let codec = config.codec()?;
    let metrics = telemetry::install();
    let health = Health::default();
    let listener = TcpListener::bind(&config.service.metrics_address).await.map_err(|source| Error::Io {
        context: format!("cannot listen on {} for metrics", config.service.metrics_address),
        source,
    })?;
    let address = listener.local_addr().map_or_else(|_| config.service.metrics_address.clone(), |a| a.to_string());
    tracing::info!(%address, "serving /metrics, /healthz, /readyz");
    let http = tokio::spawn(telemetry::http::serve(listener, metrics, health.clone(), shutdown.clone()));

    if config.topics.create {
        ensure_core_topics(&config).await?;
    }
    let registry = Registry::shared();
    let (loaded_tx, loaded_rx) = oneshot::channel();
    let mut tasks = tokio::task::JoinSet::new();
    let mut names = std::collections::HashMap::new();
    let watcher = watcher::run(config.clone(), codec.clone(), registry.clone(), loaded_tx, shutdown.clone());
    names.insert(tasks.spawn(watcher).id(), "deployments watcher");
    let mut early_exit = shutdown.clone();
    tokio::select! {
        loaded = loaded_rx => if loaded.is_err() {
            // The watcher ended before loading: its error is reported below.
            trigger.trigger();
        },
        _ = early_exit.recv() => {}
    }
    if !shutdown.is_triggered() {
        if roles != Roles::Merge {
            let id = tasks.spawn(route::run(config.clone(), codec.clone(), registry.clone(), shutdown.clone())).id();
            names.insert(id, "route");
        }
        if roles != Roles::Route {
            names.insert(tasks.spawn(merge::run(config.clone(), codec.clone(), shutdown.clone())).id(), "merge");
            let score = quality::stage::run(config.clone(), codec.clone(), registry.clone(), shutdown.clone());
            names.insert(tasks.spawn(score).id(), "score");
        }
        // Every instance is a candidate controller; one at a time leads.
        let controller = rollout::controller::run(config.clone(), codec.clone(), shutdown.clone());
        names.insert(tasks.spawn(controller).id(), "controller");
        health.set_ready(true);
        tracing::info!(?roles, "switchyard running");
    }
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next_with_id().await {
        let name = |id| names.get(&id).copied().unwrap_or("a");
        let outcome = match joined {
            Ok((id, outcome)) => outcome.map_err(|source| Error::Task { task: name(id), source: Box::new(source) }),
            Err(e) => Err(Error::Panicked { task: name(e.id()), detail: e.to_string() }),
        };
        if let Err(error) = outcome {
            tracing::error!(%error, "task failed; shutting down");
            trigger.trigger();
            if result.is_ok() {
                result = Err(error);
            }
        }
    }
    health.set_ready(false);
    trigger.trigger();
    let _ = http.await;
    result
}
