//! Wiring: open storage, resolve credentials, bind both ports, run until told to stop.
//!
//! [`Application::build`] binds the listeners, so tests can configure port 0 and read the real
//! addresses before [`Application::run_until_stopped`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::{self, CallbackCredentials, CredentialSource};
use crate::configuration::Settings;
use crate::http::{self, ConnectionLimits, api::ApiState, callback::CallbackState};
use crate::metrics::Metrics;
use crate::storage::Store;
use crate::telemetry::ErrorChain;

/// The API port serves operators and Prometheus, not the platform: modest fixed limits.
const API_LIMITS: ConnectionLimits = ConnectionLimits {
    header_read_timeout: Duration::from_secs(10),
    max_headers: 64,
    max_connections: 256,
};

pub struct Application {
    /// Bound in `build`, so that a test configures port 0 and reads the real address.
    callback_listener: TcpListener,
    /// The operator API and `/metrics`, bound like the callback port.
    api_listener: TcpListener,
    /// Shared by both ports and the background tasks; closed (drained) after both stop.
    store: Arc<dyn Store>,
    /// The SQLite file, when that backend is used.
    database_path: Option<std::path::PathBuf>,
    /// What every callback connection needs (store, metrics, credentials, limits, budget).
    callback_state: Arc<CallbackState>,
    /// What every API connection needs (store, metrics, token).
    api_state: Arc<ApiState>,
    /// How long in-flight requests may finish after a stop signal (`shutdown.drain_timeout_s`).
    drain_timeout: Duration,
    /// How often job deadlines are applied (`jobs.sweep_interval_ms`).
    sweep_interval: Duration,
    /// How often raw bodies past `retention` are pruned.
    prune_interval: Duration,
    /// How long raw bodies are kept (`storage.retention_days`).
    retention: Duration,
    /// Timeouts and connection limits of the callback port (`callback.*`).
    callback_limits: ConnectionLimits,
    /// Present when `callback.tls` is configured.
    callback_tls: Option<tokio_rustls::TlsAcceptor>,
    /// Where the accepted callback credentials came from; the CLI tells the operator.
    pub credential_source: CredentialSource,
    /// The accepted pairs, configured and rotated; refreshed every `credentials_refresh`.
    callback_credentials: Arc<CallbackCredentials>,
    /// How often the rotated pairs are read again (`platform.credentials_refresh_ms`).
    credentials_refresh: Duration,
    /// The link to check periodically (`platform.check_interval_s` > 0).
    platform_check: Option<crate::configuration::PlatformSettings>,
    /// For the platform check's gauge.
    metrics: Arc<Metrics>,
    /// One per configured sink; started with the servers.
    dispatchers: Vec<crate::outbox::Dispatcher>,
    /// The sinks were registered in `build` (else dispatch registers them first).
    sinks_registered: bool,
    /// How long events are kept (`events.retention_days`).
    event_retention: Duration,
}

impl Application {
    /// Checks the settings as `check-config` does (a [`crate::configuration::SettingsError`] in
    /// the chain is a configuration error: exit 2), then opens storage and binds both ports.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        settings.validate_for_serving()?;
        let metrics = Arc::new(Metrics::new().context("failed to set up metrics")?);
        // Writes record events as `events.enabled` says, however the settings were made.
        let mut storage = settings.storage.clone();
        storage.record_events = settings.events.enabled;
        let (store, database_path) = crate::storage::open(
            &storage,
            Duration::from_secs(settings.jobs.default_timeout_s),
            Arc::clone(&metrics),
            crate::storage::Purpose::Serve,
        )
        .await?;
        let (credentials, credential_source) = auth::resolve_credentials(
            &settings.callback.credentials,
            &settings.storage.generated_credentials_path(),
        )?;
        let callback_listener = TcpListener::bind(settings.callback.listen)
            .await
            .with_context(|| {
                format!(
                    "failed to listen for callbacks on {}",
                    settings.callback.listen
                )
            })?;
        let api_listener = TcpListener::bind(settings.api.listen)
            .await
            .with_context(|| format!("failed to listen for the API on {}", settings.api.listen))?;
        let shared_store = Arc::clone(&store);
        let callback_credentials =
            Arc::new(CallbackCredentials::load(&credentials, Arc::clone(&store)).await);
        for warning in settings.platform.warnings() {
            tracing::warn!("{warning}");
        }
        metrics.watch_platform_services(if settings.platform.check_interval_s > 0 {
            &settings.platform.services
        } else {
            &[]
        });
        let callback_state = Arc::new(CallbackState::new(
            Arc::clone(&shared_store),
            Arc::clone(&metrics),
            Arc::clone(&callback_credentials),
            settings.callback.source_policy()?,
            &settings.callback,
        ));
        let readiness_timeout =
            Duration::from_millis(settings.storage.busy_timeout_ms) + Duration::from_secs(2);
        let dispatchers = crate::outbox::dispatchers(&settings.events, &store, &metrics)?;
        // Before the first callback: a new sink is sent what happens from its registration on.
        // A store that cannot answer yet is asked again when dispatch starts.
        let sinks_registered = dispatchers.is_empty()
            || store
                .register_sinks(
                    dispatchers
                        .iter()
                        .map(|dispatcher| dispatcher.spec.clone())
                        .collect(),
                )
                .await
                .is_ok();
        metrics.register_sinks(
            &dispatchers
                .iter()
                .map(|dispatcher| dispatcher.spec.name.clone())
                .collect::<Vec<_>>(),
        );
        let api_state = Arc::new(ApiState::new(
            shared_store,
            Arc::clone(&metrics),
            settings.api.token.as_ref(),
            readiness_timeout,
        ));
        Ok(Self {
            callback_listener,
            api_listener,
            store,
            database_path,
            callback_state,
            api_state,
            drain_timeout: Duration::from_secs(settings.shutdown.drain_timeout_s),
            sweep_interval: Duration::from_millis(settings.jobs.sweep_interval_ms),
            prune_interval: Duration::from_secs(settings.storage.prune_interval_s),
            retention: Duration::from_secs(u64::from(settings.storage.retention_days) * 86_400),
            callback_tls: settings
                .callback
                .tls
                .as_ref()
                .map(|tls| crate::tls::acceptor(&tls.cert_path, &tls.key_path))
                .transpose()?,
            callback_limits: ConnectionLimits {
                header_read_timeout: Duration::from_millis(
                    settings.callback.header_read_timeout_ms,
                ),
                max_headers: settings.callback.max_headers,
                max_connections: settings.callback.max_connections,
            },
            credential_source,
            callback_credentials,
            credentials_refresh: Duration::from_millis(settings.platform.credentials_refresh_ms),
            platform_check: (settings.platform.check_interval_s > 0)
                .then(|| settings.platform.clone()),
            metrics,
            dispatchers,
            sinks_registered,
            event_retention: Duration::from_secs(
                u64::from(settings.events.retention_days) * 86_400,
            ),
        })
    }

    pub fn callback_address(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.callback_listener.local_addr()?)
    }

    pub fn api_address(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.api_listener.local_addr()?)
    }

    /// The SQLite file; `None` on PostgreSQL.
    pub fn database_path(&self) -> Option<&std::path::Path> {
        self.database_path.as_deref()
    }

    /// Serves until `shutdown` completes; then stops accepting, lets in-flight callbacks commit and
    /// be answered, and finishes the queued writes before returning.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let (stop, stopped) = watch::channel(false);
        let callback_state = self.callback_state;
        let callback_server = tokio::spawn(http::serve(
            "callback",
            self.callback_listener,
            move |request, peer| http::callback::handle(Arc::clone(&callback_state), request, peer),
            stopped.clone(),
            self.drain_timeout,
            self.callback_limits,
            self.callback_tls,
        ));
        let api_state = self.api_state;
        let api_server = tokio::spawn(http::serve(
            "api",
            self.api_listener,
            move |request, peer| http::api::handle(Arc::clone(&api_state), request, peer),
            stopped,
            self.drain_timeout,
            API_LIMITS,
            None,
        ));
        let sweeper = tokio::spawn(sweep_overdue_jobs(
            Arc::clone(&self.store),
            self.sweep_interval,
        ));
        let pruner = tokio::spawn(prune_raw_bodies(
            Arc::clone(&self.store),
            self.prune_interval,
            self.retention,
            self.event_retention,
        ));
        let (stop_dispatch, dispatch_stopped) = watch::channel(false);
        let dispatch = tokio::spawn(dispatch_events(
            Arc::clone(&self.store),
            self.dispatchers,
            self.sinks_registered,
            dispatch_stopped,
        ));
        let refresher = tokio::spawn(refresh_credentials(
            Arc::clone(&self.callback_credentials),
            self.credentials_refresh,
        ));
        let platform_check = self.platform_check.map(|platform| {
            tokio::spawn(crate::platform::watch::run(
                platform,
                Arc::clone(&self.callback_credentials),
                Arc::clone(&self.store),
                Arc::clone(&self.metrics),
            ))
        });
        shutdown.await;
        sweeper.abort();
        pruner.abort();
        refresher.abort();
        if let Some(platform_check) = platform_check {
            platform_check.abort();
        }
        // An attempt cut short is made again: its lease expires (or, on SQLite, is cleared at the
        // next start), and the event id lets the receiver see it is the same event.
        let _ = stop_dispatch.send(true);
        dispatch.abort();
        tracing::info!("shutting down: no new connections; finishing in-flight callbacks");
        let _ = stop.send(true);
        let (callback_result, api_result) = tokio::join!(callback_server, api_server);
        self.store.close().await;
        callback_result.context("callback server task failed")?;
        api_result.context("API server task failed")?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Moves overdue jobs to their final state every `interval`.
async fn sweep_overdue_jobs(store: Arc<dyn Store>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match store.sweep_jobs(time::OffsetDateTime::now_utc()).await {
            Ok(0) => {}
            Ok(changed) => tracing::info!(jobs = changed, "jobs reached their deadline"),
            Err(error) => {
                tracing::warn!(error = %ErrorChain(&error), "job deadline sweep failed; retrying at the next interval")
            }
        }
    }
}

/// Reads the rotated callback credentials again every `interval`, so that a pair rotated by any
/// replica or command is known (and a retired configured pair's overlap applies) without a restart.
async fn refresh_credentials(credentials: Arc<CallbackCredentials>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        credentials.reload().await;
    }
}

/// Registers the sinks (retrying until the store answers), then runs one dispatcher per sink.
async fn dispatch_events(
    store: Arc<dyn Store>,
    dispatchers: Vec<crate::outbox::Dispatcher>,
    registered: bool,
    stop: watch::Receiver<bool>,
) {
    if dispatchers.is_empty() {
        return;
    }
    let sinks: Vec<_> = dispatchers
        .iter()
        .map(|dispatcher| dispatcher.spec.clone())
        .collect();
    let poll = dispatchers
        .iter()
        .map(|dispatcher| dispatcher.poll)
        .min()
        .unwrap_or(Duration::from_secs(1));
    if !registered {
        while let Err(error) = store.register_sinks(sinks.clone()).await {
            tracing::warn!(error = %ErrorChain(&error), "cannot register the event sinks yet; retrying");
            tokio::time::sleep(poll.max(Duration::from_millis(500))).await;
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for dispatcher in dispatchers {
        tasks.spawn(dispatcher.run(stop.clone()));
    }
    while tasks.join_next().await.is_some() {}
}

/// Prunes raw bodies older than `retention`, and events older than `event_retention`, every
/// `interval` (the first time right away).
async fn prune_raw_bodies(
    store: Arc<dyn Store>,
    interval: Duration,
    retention: Duration,
    event_retention: Duration,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let cutoff = time::OffsetDateTime::now_utc() - retention;
        match store.prune_raw_bodies(cutoff).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "pruned raw bodies past storage.retention_days"),
            Err(error) => tracing::warn!(
                error = %ErrorChain(&error),
                "pruning failed; retrying at the next interval"
            ),
        }
        let cutoff = time::OffsetDateTime::now_utc() - event_retention;
        let mut pruned = 0;
        loop {
            match store.prune_events(cutoff).await {
                Ok(0) => break,
                Ok(count) => pruned += count,
                Err(error) => {
                    tracing::warn!(error = %ErrorChain(&error), "pruning events failed; retrying at the next interval");
                    break;
                }
            }
        }
        if pruned > 0 {
            tracing::info!(pruned, "pruned events past events.retention_days");
        }
    }
}

/// Registers for SIGINT and SIGTERM now, so that a signal arriving during start-up is not lost
/// (or, worse, handled by the default action: exit without draining), and returns a future that
/// completes when one arrives. Call from inside the runtime.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = terminate.recv() => {},
                _ = interrupt.recv() => {},
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
