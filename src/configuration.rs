//! Settings: built-in defaults, then an optional TOML file, then `M2M_`-prefixed environment
//! variables (`__` between levels, e.g. `M2M_STORAGE__PATH`).
//!
//! Every problem is reported with the key it concerns, so a bad deployment fails at start with a
//! message an operator can act on.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::domain::Secret;

/// ThingSpace refuses longer callback usernames and passwords at registration.
pub const MAX_CREDENTIAL_LENGTH: usize = 40;

/// Environment variables read by the command line (`--config`, `--api-url`), not settings.
const COMMAND_LINE_VARIABLES: &[&str] = &["M2M_CONFIG", "M2M_API_URL"];

/// Whether an environment variable is a setting: `M2M_`-prefixed, except the command line's own
/// variables and the test suite's (`M2M_TEST_POSTGRES_URL`...), which listeners started by the
/// tests inherit.
fn is_setting_variable(name: &str) -> bool {
    name.starts_with("M2M_")
        && !name.starts_with("M2M_TEST_")
        && !COMMAND_LINE_VARIABLES.contains(&name)
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(String);

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub callback: CallbackSettings,
    pub api: ApiSettings,
    pub storage: StorageSettings,
    pub telemetry: TelemetrySettings,
    pub shutdown: ShutdownSettings,
    pub jobs: JobSettings,
    pub platform: PlatformSettings,
    pub events: EventSettings,
}

/// The outbox and its sinks (`[events]`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventSettings {
    /// Record events (in the transaction of their cause). Off, nothing is recorded, the feed is
    /// empty and no sink may be configured.
    pub enabled: bool,
    /// Events older than this are deleted with their delivery records.
    pub retention_days: u32,
    /// How often an idle dispatcher looks for due events.
    pub poll_interval_ms: u64,
    #[serde(deserialize_with = "list_or_indexed_map")]
    pub webhooks: Vec<WebhookSettings>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsSettings>,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            retention_days: 30,
            poll_interval_ms: 250,
            webhooks: Vec::new(),
            nats: None,
        }
    }
}

/// One Standard Webhooks endpoint (`[[events.webhooks]]`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    pub name: String,
    pub url: String,
    /// `whsec_` and base64; masked by `check-config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
    /// During a rotation: every one signs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<Secret>,
    /// Event types sent; empty: all.
    #[serde(default)]
    pub events: Vec<String>,
    /// Seconds before each retry after a failed attempt (with a tenth of jitter); then the event
    /// is dead-lettered for this endpoint.
    #[serde(default = "default_retry_schedule")]
    pub retry_schedule_s: Vec<u64>,
    #[serde(default = "default_webhook_timeout")]
    pub timeout_ms: u64,
}

impl WebhookSettings {
    /// Every signing secret, `secret` first.
    pub fn signing_secrets(&self) -> Vec<&Secret> {
        self.secret.iter().chain(self.secrets.iter()).collect()
    }
}

fn default_retry_schedule() -> Vec<u64> {
    vec![5, 300, 1800, 7200, 18000, 36000, 36000]
}

fn default_webhook_timeout() -> u64 {
    15_000
}

/// NATS JetStream (`[events.nats]`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSettings {
    pub url: String,
    /// Created (subjects `<subject_prefix>.>`) if it does not exist.
    pub stream: String,
    pub subject_prefix: String,
    #[serde(default)]
    pub events: Vec<String>,
    #[serde(default = "default_retry_schedule")]
    pub retry_schedule_s: Vec<u64>,
    #[serde(default = "default_nats_timeout")]
    pub timeout_ms: u64,
}

fn default_nats_timeout() -> u64 {
    5_000
}

/// The types a sink's `events` names; `None` for all. Unknown names are refused by `validate`.
pub fn event_filter(names: &[String]) -> Option<Vec<crate::storage::events::EventType>> {
    if names.is_empty() {
        return None;
    }
    Some(
        names
            .iter()
            .filter_map(|name| crate::storage::events::EventType::from_label(name))
            .collect(),
    )
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallbackSettings {
    /// Where the platform posts callbacks. 9001 is one of the ports it accepts.
    #[serde(deserialize_with = "socket_address")]
    pub listen: SocketAddr,
    /// Larger bodies are refused with 413. A 10,000-device upload callback is about 3 MB.
    pub max_body_bytes: u64,
    /// Memory for callback bodies in flight (read, checked, parsed, waiting for their commit),
    /// all connections together, reserved as their bytes arrive. Past it a body waits up to
    /// `inflight_wait_ms`, then is answered 503 (the platform retries) instead of being read.
    pub max_inflight_bytes: u64,
    /// How long a body waits for room under `max_inflight_bytes` before its 503.
    pub inflight_wait_ms: u64,
    /// A client must send its request headers within this; also how long a kept-alive
    /// connection may wait idle for its next request.
    pub header_read_timeout_ms: u64,
    /// The whole body must arrive within this (a slow drip is cut off with 408).
    pub body_read_timeout_ms: u64,
    /// Connections served at once; past it new ones wait in the accept queue.
    pub max_connections: usize,
    /// Requests with more header fields are refused.
    pub max_headers: usize,
    /// Source addresses (CIDRs or single addresses) allowed to post callbacks; empty: any.
    /// From the environment also as one comma-separated string.
    #[serde(deserialize_with = "string_list")]
    pub allowed_sources: Vec<String>,
    /// Proxies whose `X-Forwarded-For` names the client; from anyone else it is ignored.
    #[serde(deserialize_with = "string_list")]
    pub trusted_proxies: Vec<String>,
    /// Serve callbacks over TLS with this certificate and key (optional; a TLS proxy in front is
    /// the usual setup).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSettings>,
    /// Accepted username/password pairs. Several may be valid at once (rotation, several billing
    /// accounts on one URL). Empty: a pair is generated on first start.
    #[serde(deserialize_with = "list_or_indexed_map")]
    pub credentials: Vec<CredentialSettings>,
}

impl CallbackSettings {
    /// The parsed source rules; an entry that is not a CIDR is reported with its key.
    pub fn source_policy(&self) -> Result<crate::access::SourcePolicy, SettingsError> {
        let parse = |key: &str, entries: &[String]| {
            entries
                .iter()
                .enumerate()
                .map(|(index, entry)| {
                    entry.parse::<crate::access::Cidr>().map_err(|error| {
                        SettingsError(format!(
                            "invalid configuration: callback.{key}[{index}]: {error}"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(crate::access::SourcePolicy::new(
            parse("allowed_sources", &self.allowed_sources)?,
            parse("trusted_proxies", &self.trusted_proxies)?,
        ))
    }
}

impl Default for CallbackSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9001)),
            max_body_bytes: 16 * 1024 * 1024,
            max_inflight_bytes: 256 * 1024 * 1024,
            inflight_wait_ms: 2_000,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 60_000,
            max_connections: 1024,
            max_headers: 64,
            allowed_sources: Vec::new(),
            trusted_proxies: Vec::new(),
            tls: None,
            credentials: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first. The platform requires a certificate from a public CA.
    pub cert_path: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_path: PathBuf,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSettings {
    /// As registered with `RegisterCallback`. Left out, it is empty: what the platform sends for
    /// a registration without a username (`M2M_CALLBACK__CREDENTIALS__0__PASSWORD` alone).
    #[serde(default)]
    pub username: String,
    /// Always given, even when empty (`password = ""`): an empty pair is accepted only when it
    /// is configured on purpose.
    pub password: Secret,
    /// A label for the billing account this pair belongs to, kept on each delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    /// The query API, `/readyz` and `/metrics`. Loopback by default: it is for operators.
    #[serde(deserialize_with = "socket_address")]
    pub listen: SocketAddr,
    /// Bearer token for the API; required when `listen` is not a loopback address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            token: None,
        }
    }
}

/// SQLite's `synchronous` levels, all four of them (its own names, any case).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// No fsync at all: survives a process crash, but power loss or an OS crash can lose
    /// acknowledged callbacks and even damage the file. For throwaway test databases only.
    Off,
    /// Durable across process crashes, not power loss, in WAL mode.
    Normal,
    /// Durable across power loss: the default, because an acknowledged callback is never re-sent.
    #[default]
    Full,
    /// As `full`, with the additional directory syncs of SQLite's `EXTRA`.
    Extra,
}

impl Synchronous {
    pub fn pragma_value(self) -> &'static str {
        match self {
            Synchronous::Off => "OFF",
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
        }
    }
}

impl Choice for Synchronous {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("off", Synchronous::Off),
        ("normal", Synchronous::Normal),
        ("full", Synchronous::Full),
        ("extra", Synchronous::Extra),
    ];
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// The SQLite database file; its directory is created if missing.
    pub path: PathBuf,
    pub synchronous: Synchronous,
    /// How long a write waits for a lock held by another process before answering 503.
    pub busy_timeout_ms: u64,
    /// The most deliveries committed in one transaction (group commit).
    pub max_batch: usize,
    /// Raw bodies older than this are pruned (delivery records, outcomes and jobs are kept, and
    /// so are quarantined bodies and those of unfinished jobs).
    pub retention_days: u32,
    /// How often pruning runs.
    pub prune_interval_s: u64,
    /// A PostgreSQL URL (`postgres://user:password@host:5432/database`): selects the PostgreSQL
    /// backend, which several replicas can share, instead of the SQLite file at `path`. Libpq
    /// parameters work in the query string, e.g. `?options=-c%20search_path%3Dm2m`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_masked_url"
    )]
    pub url: Option<Secret>,
    /// PostgreSQL connections kept by this replica (writers and API reads share them).
    pub pool_size: usize,
    /// PEM certificates the PostgreSQL server's certificate must chain to (and name the URL's
    /// host). Without it, TLS (per the URL's `sslmode`: `prefer` by default, `require`,
    /// `disable`) encrypts but does not check the certificate, as libpq's `require`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Whether writes record events in the outbox: `events.enabled`, copied here on load.
    #[serde(skip)]
    pub record_events: bool,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("./data/m2m-listener.db"),
            synchronous: Synchronous::Full,
            busy_timeout_ms: 5_000,
            max_batch: 256,
            retention_days: 30,
            prune_interval_s: 3600,
            url: None,
            pool_size: 16,
            ca_file: None,
            record_events: true,
        }
    }
}

impl StorageSettings {
    /// The PostgreSQL URL, when that backend is selected.
    pub fn postgres_url(&self) -> Option<&str> {
        self.url
            .as_ref()
            .map(Secret::expose)
            .filter(|url| !url.is_empty())
    }

    /// Where generated callback credentials are kept: beside the database.
    pub fn generated_credentials_path(&self) -> PathBuf {
        let directory = self
            .path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty());
        directory
            .unwrap_or(Path::new("."))
            .join("callback-credentials.toml")
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Lines for people; the start-up banner shares stdout with them.
    #[default]
    Pretty,
    /// JSON lines for log pipelines; stdout holds nothing else (the banner goes to stderr).
    Json,
}

impl Choice for LogFormat {
    const CHOICES: &'static [(&'static str, Self)] =
        &[("pretty", LogFormat::Pretty), ("json", LogFormat::Json)];
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    pub format: LogFormat,
    /// A tracing filter (`info`, `m2m_listener=debug`...); `RUST_LOG` wins when set (and valid).
    /// Checked with the other settings, so `check-config` refuses what `serve` would.
    pub level: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".to_owned(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobSettings {
    /// A job's deadline, from registration (or its first callback), unless it sets `timeout_s`.
    /// Activations can take up to 24 hours.
    pub default_timeout_s: u64,
    /// How often overdue jobs are moved to `timed_out`.
    pub sweep_interval_ms: u64,
}

impl Default for JobSettings {
    fn default() -> Self {
        Self {
            default_timeout_s: 24 * 3600,
            sweep_interval_ms: 60_000,
        }
    }
}

/// The platform link (`m2m-listener platform ...`, and the periodic check while serving): the
/// platform's REST API, the logins it takes, and what to hold registered there.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlatformSettings {
    /// The OAuth base URL (`POST {oauth_url}/oauth2/token`).
    pub oauth_url: String,
    /// The M2M REST base URL (session and callback registration endpoints).
    pub m2m_url: String,
    /// The OAuth key of the ThingSpace application (client credentials).
    pub client_id: String,
    /// The OAuth secret.
    pub client_secret: Secret,
    /// The UWS login. Five failed logins in a row lock it: a failed login is never retried.
    pub username: String,
    pub password: Secret,
    /// The billing account whose callback registrations are managed.
    pub account: String,
    /// The public URL the platform posts callbacks to (this listener, or its proxy).
    pub callback_url: String,
    /// The callback services to hold registered to `callback_url` (PLATFORM.md's list).
    /// From the environment also as one comma-separated string.
    #[serde(deserialize_with = "string_list")]
    pub services: Vec<String>,
    /// While serving, check the registrations this often (0: never).
    pub check_interval_s: u64,
    /// After `platform rotate`, the previous callback password is accepted this long (the
    /// platform keeps sending it for 9-14 minutes after a re-registration), then refused.
    pub rotation_overlap_s: u64,
    /// How often a serving listener reads the rotated credentials from the database again (an
    /// unknown pair also makes it read them, at most ten times a second).
    pub credentials_refresh_ms: u64,
    /// Each request to the platform must be answered within this.
    pub request_timeout_s: u64,
}

impl Default for PlatformSettings {
    fn default() -> Self {
        Self {
            oauth_url: "https://thingspace.verizon.com/api/ts/v1".to_owned(),
            m2m_url: "https://thingspace.verizon.com/api/m2m".to_owned(),
            client_id: String::new(),
            client_secret: Secret::new(""),
            username: String::new(),
            password: Secret::new(""),
            account: String::new(),
            callback_url: String::new(),
            services: Vec::new(),
            check_interval_s: 0,
            rotation_overlap_s: 86_400,
            credentials_refresh_ms: 10_000,
            request_timeout_s: 30,
        }
    }
}

impl PlatformSettings {
    /// What a `platform` command (or the periodic check) needs: every key it uses set.
    pub fn require_link(&self) -> Result<(), SettingsError> {
        for (key, missing) in [
            ("client_id", self.client_id.is_empty()),
            ("client_secret", self.client_secret.is_empty()),
            ("username", self.username.is_empty()),
            ("password", self.password.is_empty()),
            ("account", self.account.is_empty()),
            ("callback_url", self.callback_url.is_empty()),
            ("services", self.services.is_empty()),
        ] {
            if missing {
                return Err(SettingsError(format!(
                    "invalid configuration: platform.{key}: is required for the platform link \
                     (M2M_PLATFORM__{})",
                    key.to_uppercase()
                )));
            }
        }
        Ok(())
    }

    /// Warnings about settings that work but should not be used in production: plain `http://`.
    pub fn warnings(&self) -> Vec<String> {
        [
            ("oauth_url", &self.oauth_url),
            ("m2m_url", &self.m2m_url),
            ("callback_url", &self.callback_url),
        ]
        .into_iter()
        .filter(|(_, url)| url.starts_with("http://"))
        .map(|(key, url)| {
            format!(
                "platform.{key} ({url}) is plain http://: secrets cross the network unencrypted \
                 (acceptable for tests and a local proxy only)"
            )
        })
        .collect()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSettings {
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    pub drain_timeout_s: u64,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self {
            drain_timeout_s: 30,
        }
    }
}

impl Settings {
    /// Defaults, then `file` if given, then the environment; validated.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        // The command line's own variables share the prefix but are not settings.
        let environment = std::env::vars()
            .filter(|(name, _)| is_setting_variable(name))
            .collect();
        Self::load_with_environment(file, Some(environment))
    }

    /// As [`Self::load`], reading the environment from `environment` when given (tests).
    pub fn load_with_environment(
        file: Option<&Path>,
        environment: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Self, SettingsError> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            if !file.exists() {
                return Err(SettingsError(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        let environment_source = config::Environment::with_prefix("M2M")
            .prefix_separator("_")
            .separator("__")
            .source(environment);
        let settings: Settings = builder
            .add_source(environment_source)
            .build()
            .and_then(|merged| merged.try_deserialize())
            .map_err(|error| {
                SettingsError(format!(
                    "invalid configuration: {}",
                    describe_config_error(error)
                ))
            })?;
        let mut settings = settings;
        settings.storage.record_events = settings.events.enabled;
        settings.validate()?;
        Ok(settings)
    }

    /// `[events]`: sinks need events; names unique; URLs, secrets, filters and schedules valid.
    /// A refusal names the key, never a secret's value.
    fn validate_events(&self) -> Result<(), SettingsError> {
        let fail = |key: &str, message: String| {
            Err(SettingsError(format!(
                "invalid configuration: {key}: {message}"
            )))
        };
        let events = &self.events;
        if events.retention_days == 0 {
            return fail(
                "events.retention_days",
                "must be at least 1, got 0".to_owned(),
            );
        }
        if events.poll_interval_ms == 0 {
            return fail(
                "events.poll_interval_ms",
                "must be at least 1, got 0".to_owned(),
            );
        }
        if !events.enabled && (!events.webhooks.is_empty() || events.nats.is_some()) {
            return fail(
                "events.enabled",
                "is false, but sinks are configured: they would never be sent anything".to_owned(),
            );
        }
        let check_filter = |key: &str, names: &[String]| {
            for name in names {
                if crate::storage::events::EventType::from_label(name).is_none() {
                    return fail(
                        key,
                        format!(
                            "unknown event type {name:?} (known: job.finished, device.outcome, \
                             device.message, delivery.quarantined)"
                        ),
                    );
                }
            }
            Ok(())
        };
        let mut names = std::collections::HashSet::new();
        for (index, webhook) in events.webhooks.iter().enumerate() {
            let key = |field: &str| format!("events.webhooks[{index}].{field}");
            if webhook.name.is_empty()
                || webhook.name.len() > 64
                || !webhook
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return fail(
                    &key("name"),
                    "must be 1 to 64 letters, digits, '-' or '_'".to_owned(),
                );
            }
            if webhook.name == "nats" || !names.insert(webhook.name.as_str()) {
                return fail(
                    &key("name"),
                    format!(
                        "{:?} is used twice (\"nats\" is the NATS sink's)",
                        webhook.name
                    ),
                );
            }
            match webhook.url.parse::<hyper::Uri>() {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http") | Some("https"))
                        && uri.host().is_some() => {}
                _ => {
                    return fail(
                        &key("url"),
                        "must be an http:// or https:// URL with a host".to_owned(),
                    );
                }
            }
            let secrets = webhook.signing_secrets();
            if secrets.is_empty() {
                return fail(&key("secret"), "set secret or secrets".to_owned());
            }
            for secret in secrets {
                let decoded = secret.expose().strip_prefix("whsec_").map(|key| {
                    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, key)
                });
                if !matches!(decoded, Some(Ok(ref key)) if key.len() >= 16) {
                    return fail(
                        &key("secret"),
                        "must be \"whsec_\" and the base64 of at least 16 bytes (value not shown)"
                            .to_owned(),
                    );
                }
            }
            check_filter(&key("events"), &webhook.events)?;
            if webhook.timeout_ms == 0 || webhook.timeout_ms > 300_000 {
                return fail(&key("timeout_ms"), "must be 1 to 300000".to_owned());
            }
            if webhook.retry_schedule_s.len() > 50 {
                return fail(&key("retry_schedule_s"), "at most 50 retries".to_owned());
            }
        }
        if let Some(nats) = &events.nats {
            if nats.stream.is_empty()
                || !nats
                    .stream
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return fail(
                    "events.nats.stream",
                    "must be letters, digits, '-' or '_'".to_owned(),
                );
            }
            if nats.subject_prefix.is_empty()
                || nats.subject_prefix.starts_with('.')
                || nats.subject_prefix.ends_with('.')
                || nats
                    .subject_prefix
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b == b'*' || b == b'>')
            {
                return fail(
                    "events.nats.subject_prefix",
                    "must be a subject without wildcards, spaces or a leading/trailing '.'"
                        .to_owned(),
                );
            }
            if nats.url.is_empty() {
                return fail("events.nats.url", "must be set".to_owned());
            }
            check_filter("events.nats.events", &nats.events)?;
            if nats.timeout_ms == 0 || nats.timeout_ms > 300_000 {
                return fail("events.nats.timeout_ms", "must be 1 to 300000".to_owned());
            }
        }
        Ok(())
    }

    /// Every value and every combination of values that matters to any command; no IO. `load`
    /// calls it; [`Self::validate_for_serving`] adds what only the listener itself needs.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let fail = |key: &str, message: String| {
            Err(SettingsError(format!(
                "invalid configuration: {key}: {message}"
            )))
        };
        for (index, credential) in self.callback.credentials.iter().enumerate() {
            for (field, length) in [
                ("username", credential.username.chars().count()),
                ("password", credential.password.expose().chars().count()),
            ] {
                if length > MAX_CREDENTIAL_LENGTH {
                    return fail(
                        &format!("callback.credentials[{index}].{field}"),
                        format!(
                            "is {length} characters; ThingSpace allows at most {MAX_CREDENTIAL_LENGTH}"
                        ),
                    );
                }
            }
        }
        for (key, value) in [
            (
                "callback.header_read_timeout_ms",
                self.callback.header_read_timeout_ms,
            ),
            (
                "callback.body_read_timeout_ms",
                self.callback.body_read_timeout_ms,
            ),
        ] {
            if value == 0 {
                return fail(key, format!("must be at least 1, got {value}"));
            }
        }
        if !(1..=100_000).contains(&self.callback.max_connections) {
            return fail(
                "callback.max_connections",
                format!(
                    "must be from 1 to 100000, got {}",
                    self.callback.max_connections
                ),
            );
        }
        if !(8..=1_000).contains(&self.callback.max_headers) {
            return fail(
                "callback.max_headers",
                format!("must be from 8 to 1000, got {}", self.callback.max_headers),
            );
        }
        self.callback.source_policy()?;
        if self.callback.max_body_bytes < 1024 {
            return fail(
                "callback.max_body_bytes",
                format!(
                    "must be at least 1024, got {}",
                    self.callback.max_body_bytes
                ),
            );
        }
        if self.callback.max_inflight_bytes < self.callback.max_body_bytes {
            return fail(
                "callback.max_inflight_bytes",
                format!(
                    "must be at least callback.max_body_bytes ({}), or no body of the largest \
                     accepted size could ever be read (got {})",
                    self.callback.max_body_bytes, self.callback.max_inflight_bytes
                ),
            );
        }
        if self.callback.inflight_wait_ms > 60_000 {
            return fail(
                "callback.inflight_wait_ms",
                format!(
                    "must be at most 60000 (the platform waits only seconds for an answer), got {}",
                    self.callback.inflight_wait_ms
                ),
            );
        }
        if self.storage.path.as_os_str().is_empty() {
            return fail("storage.path", "must not be empty".to_owned());
        }
        if !(1..=crate::jobs::MAX_TIMEOUT_S).contains(&self.jobs.default_timeout_s) {
            return fail(
                "jobs.default_timeout_s",
                format!(
                    "must be from 1 to {}, got {}",
                    crate::jobs::MAX_TIMEOUT_S,
                    self.jobs.default_timeout_s
                ),
            );
        }
        if self.jobs.sweep_interval_ms < 10 {
            return fail(
                "jobs.sweep_interval_ms",
                format!("must be at least 10, got {}", self.jobs.sweep_interval_ms),
            );
        }
        self.validate_events()?;
        if self.storage.retention_days == 0 {
            return fail(
                "storage.retention_days",
                "must be at least 1, got 0".to_owned(),
            );
        }
        if self.storage.prune_interval_s == 0 {
            return fail(
                "storage.prune_interval_s",
                "must be at least 1, got 0".to_owned(),
            );
        }
        if !(1..=10_000).contains(&self.storage.max_batch) {
            return fail(
                "storage.max_batch",
                format!("must be from 1 to 10000, got {}", self.storage.max_batch),
            );
        }
        if let Some(url) = self.storage.postgres_url() {
            // The parser's message never repeats the URL (and with it the password).
            let config = match url.parse::<tokio_postgres::Config>() {
                Ok(config) => config,
                Err(error) => {
                    return fail("storage.url", format!("is not a PostgreSQL URL: {error}"));
                }
            };
            // A checked certificate is worthless if a man in the middle can answer "no TLS".
            if self.storage.ca_file.is_some()
                && config.get_ssl_mode() == tokio_postgres::config::SslMode::Disable
            {
                return fail(
                    "storage.ca_file",
                    "is set, but storage.url says sslmode=disable: with a CA to check the \
                     server against, TLS is required (remove one of the two)"
                        .to_owned(),
                );
            }
        }
        if !(2..=1_000).contains(&self.storage.pool_size) {
            return fail(
                "storage.pool_size",
                format!("must be from 2 to 1000, got {}", self.storage.pool_size),
            );
        }
        let token_missing = self.api.token.as_ref().is_none_or(Secret::is_empty);
        if !self.api.listen.ip().is_loopback() && token_missing {
            return fail(
                "api.token",
                format!(
                    "required because api.listen ({}) is not a loopback address",
                    self.api.listen
                ),
            );
        }
        self.validate_platform()?;
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.telemetry.level) {
            return fail(
                "telemetry.level",
                format!(
                    "{:?} is not a log filter (such as info, warn or m2m_listener=debug): {error}",
                    self.telemetry.level
                ),
            );
        }
        Ok(())
    }

    /// The `[platform]` values that are set (a link not configured at all is valid: it is off).
    fn validate_platform(&self) -> Result<(), SettingsError> {
        let platform = &self.platform;
        let fail = |key: &str, message: String| {
            Err(SettingsError(format!(
                "invalid configuration: platform.{key}: {message}"
            )))
        };
        for (key, url) in [
            ("oauth_url", &platform.oauth_url),
            ("m2m_url", &platform.m2m_url),
            ("callback_url", &platform.callback_url),
        ] {
            // A callback URL is set when the link is used; left empty, the link is off.
            if key == "callback_url" && url.is_empty() {
                continue;
            }
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return fail(key, format!("{url:?} is not an https:// (or http://) URL"));
            }
            if url.parse::<hyper::Uri>().is_err() {
                return fail(key, format!("{url:?} is not a URL"));
            }
        }
        for (index, service) in platform.services.iter().enumerate() {
            if !crate::platform::CALLBACK_SERVICES.contains(&service.as_str()) {
                let suggestion = crate::platform::CALLBACK_SERVICES
                    .iter()
                    .find(|known| known.eq_ignore_ascii_case(service))
                    .map(|known| format!(" (did you mean {known}?)"))
                    .unwrap_or_default();
                return fail(
                    &format!("services[{index}]"),
                    format!(
                        "{service:?} is not a documented callback service name{suggestion}; one of {}",
                        crate::platform::CALLBACK_SERVICES.join(", ")
                    ),
                );
            }
        }
        if platform.rotation_overlap_s == 0 {
            return fail(
                "rotation_overlap_s",
                "must be at least 1 (the platform keeps sending the previous password for minutes)"
                    .to_owned(),
            );
        }
        if !(100..=3_600_000).contains(&platform.credentials_refresh_ms) {
            return fail(
                "credentials_refresh_ms",
                format!(
                    "must be from 100 to 3600000, got {}",
                    platform.credentials_refresh_ms
                ),
            );
        }
        if !(1..=600).contains(&platform.request_timeout_s) {
            return fail(
                "request_timeout_s",
                format!("must be from 1 to 600, got {}", platform.request_timeout_s),
            );
        }
        if platform.check_interval_s > 0 {
            platform.require_link()?;
        }
        Ok(())
    }

    /// What serving needs beyond [`Self::validate`]: callback credentials configured when
    /// storage.url is set (a generated pair would differ per replica), and the files the settings
    /// name readable and usable (the callback port's TLS certificate and key, the PostgreSQL CA).
    /// [`crate::startup::Application::build`] and `check-config` call it, so `check-config`
    /// refuses exactly what `serve` refuses. The other commands do not: `prune` or `backup` need
    /// no callback credentials, and an operator running `jobs` may rightly be unable to read the
    /// TLS key.
    pub fn validate_for_serving(&self) -> Result<(), SettingsError> {
        if self.storage.postgres_url().is_some() && self.callback.credentials.is_empty() {
            return Err(SettingsError(
                "invalid configuration: callback.credentials: must be configured when \
                 storage.url is set: every replica must accept the same pair (a generated pair \
                 is kept beside a SQLite file only)"
                    .to_owned(),
            ));
        }
        if let Some(tls) = &self.callback.tls {
            crate::tls::acceptor(&tls.cert_path, &tls.key_path).map_err(|error| {
                SettingsError(format!("invalid configuration: callback.tls: {error:#}"))
            })?;
        }
        if let (Some(path), Some(_)) = (&self.storage.ca_file, self.storage.postgres_url()) {
            certificates_in(path).map_err(|message| {
                SettingsError(format!("invalid configuration: storage.ca_file: {message}"))
            })?;
        }
        Ok(())
    }

    /// The effective settings as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|error| format!("# cannot render settings: {error}\n"))
    }
}

/// A database URL as `check-config` shows it: the password masked, the rest kept.
fn serialize_masked_url<S: serde::Serializer>(
    url: &Option<Secret>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let Some(url) = url else {
        return serializer.serialize_none();
    };
    serializer.serialize_str(&mask_url_password(url.expose()))
}

/// A PostgreSQL URL as it may be shown: rebuilt from its parsed parts (user, hosts, ports,
/// database, a non-default `sslmode`), never from the text, so that a password however written
/// (unencoded `/` or `?`, in the query string, in a key=value string) cannot come through.
pub fn mask_url_password(url: &str) -> String {
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return "********".to_owned();
    };
    let user = config.get_user().unwrap_or("");
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(index, host)| {
            let name = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(index).or(config.get_ports().first()) {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    let sslmode = match config.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => "?sslmode=disable",
        tokio_postgres::config::SslMode::Require => "?sslmode=require",
        _ => "",
    };
    format!(
        "postgres://{user}:********@{}/{}{sslmode}",
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

/// A setting with a fixed set of values, read from its name in any case and refused with the
/// bad value and every valid one (`"whenever" is not one of off|normal|full|extra`).
trait Choice: Copy + 'static {
    /// Each value's name, in the order the error message lists them.
    const CHOICES: &'static [(&'static str, Self)];
}

fn choice<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Choice,
{
    let text = String::deserialize(deserializer)?;
    T::CHOICES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(text.trim()))
        .map(|(_, value)| *value)
        .ok_or_else(|| {
            let names: Vec<&str> = T::CHOICES.iter().map(|(name, _)| *name).collect();
            serde::de::Error::custom(format!("{text:?} is not one of {}", names.join("|")))
        })
}

impl<'de> Deserialize<'de> for Synchronous {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        choice(deserializer)
    }
}

impl<'de> Deserialize<'de> for LogFormat {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        choice(deserializer)
    }
}

/// A listen address, refused with the text that is not one (serde's own message names neither).
fn socket_address<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.trim().parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is not an address and port such as 0.0.0.0:9001 or [::]:9001"
        ))
    })
}

/// A list of entries: a list in a file (`[[callback.credentials]]`), or from the environment,
/// where the config crate turns `M2M_CALLBACK__CREDENTIALS__0__USERNAME` into a map keyed by
/// the index.
fn list_or_indexed_map<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    deserializer.deserialize_any(Entries { from_text: None })
}

/// A list of strings, as [`list_or_indexed_map`] or as one string of comma-separated values
/// (`M2M_CALLBACK__ALLOWED_SOURCES=10.0.0.0/8,192.0.2.1`; empty: none).
fn string_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    deserializer.deserialize_any(Entries {
        from_text: Some(|text: &str| {
            text.split(',')
                .map(str::trim)
                .filter(|entry| !entry.is_empty())
                .map(str::to_owned)
                .collect()
        }),
    })
}

/// Visits the forms a list setting takes. Each entry is deserialized on its own, so an error
/// names the entry and the field (`callback.credentials[0]: missing field `password``) rather
/// than the form that did not match.
struct Entries<T> {
    /// How a single string becomes entries, for lists that have a text form.
    from_text: Option<fn(&str) -> Vec<T>>,
}

impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Entries<T> {
    type Value = Vec<T>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(if self.from_text.is_some() {
            "a list, entries by index (..._0, ..._1), or comma-separated values"
        } else {
            "a list, or entries by index (..._0_..., ..._1_...)"
        })
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut entries: A) -> Result<Vec<T>, A::Error> {
        let mut list = Vec::with_capacity(entries.size_hint().unwrap_or(0).min(1024));
        while let Some(entry) = entries.next_element()? {
            list.push(entry);
        }
        Ok(list)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut entries: A) -> Result<Vec<T>, A::Error> {
        let mut indexed = Vec::new();
        while let Some(key) = entries.next_key::<String>()? {
            let index: usize = key.parse().map_err(|_| {
                serde::de::Error::custom(format!("expected a list index, found key {key:?}"))
            })?;
            indexed.push((index, entries.next_value::<T>()?));
        }
        indexed.sort_by_key(|(index, _)| *index);
        if let Some(pair) = indexed.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(serde::de::Error::custom(format!(
                "list index {} is given twice",
                pair[0].0
            )));
        }
        Ok(indexed.into_iter().map(|(_, value)| value).collect())
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Vec<T>, E> {
        match self.from_text {
            Some(parse) => Ok(parse(text)),
            // Not echoed: a string given for the credentials may well hold a password.
            None => Err(E::custom(
                "expected a list, or entries by index (..._0_..., ..._1_...), not a string",
            )),
        }
    }
}

/// A config crate error in this module's form, `key: what is wrong (in where it came from)`,
/// with list indices in brackets (`callback.credentials[0].password`).
fn describe_config_error(error: config::ConfigError) -> String {
    let origin = |origin: Option<String>| {
        origin
            .map(|origin| format!(" (in {origin})"))
            .unwrap_or_default()
    };
    match error {
        config::ConfigError::At {
            error,
            origin: from,
            key: Some(key),
        } => format!("{}: {error}{}", display_key(&key), origin(from)),
        config::ConfigError::Type {
            origin: from,
            unexpected,
            expected,
            key: Some(key),
        } => format!(
            "{}: expected {expected}, got {unexpected}{}",
            display_key(&key),
            origin(from)
        ),
        config::ConfigError::NotFound(key) => format!("{}: is required", display_key(&key)),
        other => other.to_string(),
    }
}

/// `callback.credentials.0.password` (an index from the environment) and
/// `callback.credentials[0]password` (an index from a file, as the config crate writes it) both
/// as `callback.credentials[0].password`.
fn display_key(key: &str) -> String {
    let mut shown = String::with_capacity(key.len() + 4);
    for segment in key.split('.') {
        if !segment.is_empty() && segment.bytes().all(|byte| byte.is_ascii_digit()) {
            shown.push_str(&format!("[{segment}]"));
            continue;
        }
        if !shown.is_empty() {
            shown.push('.');
        }
        shown.push_str(segment);
    }
    let mut separated = String::with_capacity(shown.len() + 4);
    let mut characters = shown.chars().peekable();
    while let Some(character) = characters.next() {
        separated.push(character);
        if character == ']'
            && characters
                .peek()
                .is_some_and(|next| !matches!(next, '[' | '.'))
        {
            separated.push('.');
        }
    }
    separated
}

/// The certificates of a PEM file (at least one), or why not.
fn certificates_in(path: &Path) -> Result<usize, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem =
        std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("{} is not PEM: {error}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certificates.len())
}

impl Serialize for Secret {
    /// Serialising is for showing settings: the value never leaves masked.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.is_empty() { "" } else { "********" })
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn environment(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_need_no_file() {
        let settings = Settings::load_with_environment(None, environment(&[])).unwrap();
        assert_eq!(settings.callback.listen.to_string(), "0.0.0.0:9001");
        assert_eq!(settings.api.listen.to_string(), "127.0.0.1:9090");
        assert_eq!(
            settings.storage.path,
            PathBuf::from("./data/m2m-listener.db")
        );
        assert_eq!(settings.storage.synchronous, Synchronous::Full);
        assert_eq!(settings.callback.max_body_bytes, 16 * 1024 * 1024);
        assert_eq!(
            settings.storage.generated_credentials_path(),
            PathBuf::from("./data/callback-credentials.toml")
        );
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let settings = Settings::load_with_environment(
            None,
            environment(&[
                ("M2M_STORAGE__PATH", "/var/lib/m2m/x.db"),
                ("M2M_STORAGE__SYNCHRONOUS", "normal"),
                ("M2M_CALLBACK__MAX_BODY_BYTES", "4096"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.storage.path, PathBuf::from("/var/lib/m2m/x.db"));
        assert_eq!(settings.storage.synchronous, Synchronous::Normal);
        assert_eq!(settings.callback.max_body_bytes, 4096);
    }

    #[test]
    fn credentials_can_come_from_the_environment_by_index() {
        let settings = Settings::load_with_environment(
            None,
            environment(&[
                ("M2M_CALLBACK__CREDENTIALS__1__USERNAME", "ops"),
                ("M2M_CALLBACK__CREDENTIALS__1__PASSWORD", "new-password"),
                ("M2M_CALLBACK__CREDENTIALS__0__USERNAME", "ops"),
                ("M2M_CALLBACK__CREDENTIALS__0__PASSWORD", "old-password"),
            ]),
        )
        .unwrap();
        let passwords: Vec<&str> = settings
            .callback
            .credentials
            .iter()
            .map(|pair| pair.password.expose())
            .collect();
        assert_eq!(passwords, ["old-password", "new-password"]);
    }

    #[test]
    fn a_bad_value_is_reported_with_its_key() {
        let error = Settings::load_with_environment(
            None,
            environment(&[("M2M_STORAGE__SYNCHRONOUS", "sometimes")]),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("storage.synchronous"), "{error}");
        let error = Settings::load_with_environment(
            None,
            environment(&[("M2M_API__LISTEN", "0.0.0.0:9090")]),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("api.token"), "{error}");
    }

    #[test]
    fn a_password_alone_from_the_environment_is_a_pair_with_an_empty_username() {
        let settings = Settings::load_with_environment(
            None,
            environment(&[("M2M_CALLBACK__CREDENTIALS__0__PASSWORD", "x")]),
        )
        .unwrap();
        let pairs: Vec<(&str, &str)> = settings
            .callback
            .credentials
            .iter()
            .map(|pair| (pair.username.as_str(), pair.password.expose()))
            .collect();
        assert_eq!(pairs, [("", "x")]);
    }

    #[test]
    fn a_username_alone_is_refused_naming_the_missing_password() {
        let error = Settings::load_with_environment(
            None,
            environment(&[("M2M_CALLBACK__CREDENTIALS__0__USERNAME", "ops")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("callback.credentials[0].password: is required"),
            "{error}"
        );
    }

    #[test]
    fn source_lists_come_from_one_string_of_comma_separated_values_or_by_index() {
        let settings = Settings::load_with_environment(
            None,
            environment(&[
                ("M2M_CALLBACK__ALLOWED_SOURCES", " 10.0.0.0/8 ,192.0.2.1,"),
                ("M2M_CALLBACK__TRUSTED_PROXIES__1", "127.0.0.2"),
                ("M2M_CALLBACK__TRUSTED_PROXIES__0", "127.0.0.1"),
            ]),
        )
        .unwrap();
        assert_eq!(
            settings.callback.allowed_sources,
            ["10.0.0.0/8", "192.0.2.1"]
        );
        assert_eq!(
            settings.callback.trusted_proxies,
            ["127.0.0.1", "127.0.0.2"]
        );
        let settings = Settings::load_with_environment(
            None,
            environment(&[("M2M_CALLBACK__ALLOWED_SOURCES", "")]),
        )
        .unwrap();
        assert!(settings.callback.allowed_sources.is_empty());
    }

    #[test]
    fn credentials_given_as_one_string_are_refused_without_echoing_it() {
        let error = Settings::load_with_environment(
            None,
            environment(&[("M2M_CALLBACK__CREDENTIALS", "ops:Secret-In-A-String")]),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("callback.credentials"), "{error}");
        assert!(!error.contains("Secret-In-A-String"), "{error}");
    }

    #[test]
    fn every_synchronous_level_of_sqlite_is_accepted_in_any_case() {
        for (text, level, pragma) in [
            ("off", Synchronous::Off, "OFF"),
            ("Normal", Synchronous::Normal, "NORMAL"),
            ("FULL", Synchronous::Full, "FULL"),
            ("extra", Synchronous::Extra, "EXTRA"),
        ] {
            let settings = Settings::load_with_environment(
                None,
                environment(&[("M2M_STORAGE__SYNCHRONOUS", text)]),
            )
            .unwrap();
            assert_eq!(settings.storage.synchronous, level);
            assert_eq!(level.pragma_value(), pragma);
        }
    }

    #[test]
    fn an_invalid_log_filter_is_refused_by_validation_with_the_value() {
        let mut settings = Settings::default();
        settings.telemetry.level = "bogus[[[".to_owned();
        let error = settings.validate().unwrap_err().to_string();
        assert!(
            error.contains("telemetry.level") && error.contains("\"bogus[[[\""),
            "{error}"
        );
        settings.telemetry.level = "warn,m2m_listener=debug".to_owned();
        settings.validate().unwrap();
    }

    #[test]
    fn serving_on_postgres_needs_configured_credentials_and_other_commands_do_not() {
        let mut settings = Settings::default();
        settings.storage.url = Some(Secret::new("postgres://m2m@db/m2m"));
        settings.validate().unwrap();
        let error = settings.validate_for_serving().unwrap_err().to_string();
        assert!(error.contains("callback.credentials"), "{error}");
        settings.callback.credentials.push(CredentialSettings {
            username: "ops".to_owned(),
            password: Secret::new("pass"),
            account: None,
        });
        settings.validate_for_serving().unwrap();
    }

    #[test]
    fn a_ca_file_is_refused_with_sslmode_disable() {
        let mut settings = Settings::default();
        settings.storage.url = Some(Secret::new("postgres://m2m@db/m2m?sslmode=disable"));
        settings.validate().unwrap();
        settings.storage.ca_file = Some(PathBuf::from("/etc/ssl/db-ca.pem"));
        let error = settings.validate().unwrap_err().to_string();
        assert!(
            error.contains("storage.ca_file") && error.contains("sslmode=disable"),
            "{error}"
        );
    }

    #[test]
    fn keys_are_shown_with_list_indices_in_brackets() {
        assert_eq!(
            display_key("callback.credentials.0.password"),
            "callback.credentials[0].password"
        );
        assert_eq!(
            display_key("callback.credentials[0]password"),
            "callback.credentials[0].password"
        );
        assert_eq!(
            display_key("callback.allowed_sources[2]"),
            "callback.allowed_sources[2]"
        );
        assert_eq!(display_key("storage.path"), "storage.path");
    }

    #[test]
    fn a_source_that_is_not_a_cidr_is_reported_with_its_key() {
        let mut settings = Settings::default();
        settings.callback.allowed_sources =
            vec!["198.51.100.0/24".to_owned(), "not-a-network".to_owned()];
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("callback.allowed_sources[1]"), "{error}");
    }

    #[test]
    fn credentials_longer_than_the_platform_allows_are_refused() {
        let mut settings = Settings::default();
        settings.callback.credentials.push(CredentialSettings {
            username: "ops".to_owned(),
            password: Secret::new("x".repeat(41)),
            account: None,
        });
        let error = settings.validate().unwrap_err().to_string();
        assert!(
            error.contains("callback.credentials[0].password"),
            "{error}"
        );
    }

    #[test]
    fn masked_output_hides_every_secret() {
        let mut settings = Settings::default();
        settings.callback.credentials.push(CredentialSettings {
            username: "ops".to_owned(),
            password: Secret::new("hunter2-very-secret"),
            account: Some("0342077109-00001".to_owned()),
        });
        settings.api.token = Some(Secret::new("token-very-secret"));
        let shown = settings.to_masked_toml();
        assert!(!shown.contains("very-secret"), "{shown}");
        assert!(
            shown.contains("********") && shown.contains("username = \"ops\""),
            "{shown}"
        );
    }

    #[test]
    fn database_urls_are_shown_without_their_password_however_it_is_written() {
        for (url, secret) in [
            ("postgres://m2m:Plain-Secret@db:5432/m2m", "Plain-Secret"),
            ("postgres://m2m:ab/cd-Secret@db:5432/m2m", "cd-Secret"),
            ("postgres://m2m:ab?cd-Secret@db:5432/m2m", "cd-Secret"),
            (
                "postgres://m2m@db:5432/m2m?password=Query-Secret",
                "Query-Secret",
            ),
            (
                "postgres://m2m@db:5432/m2m?%70assword=Encoded-Secret",
                "Encoded-Secret",
            ),
            (
                "host=db user=m2m password=Kv-Secret://x dbname=m2m",
                "Kv-Secret",
            ),
            ("not a url Secret-Text", "Secret-Text"),
        ] {
            let shown = mask_url_password(url);
            assert!(!shown.contains(secret), "{url} shown as {shown}");
        }
        assert_eq!(
            mask_url_password("postgres://m2m:x@db.internal:5433/fleet?sslmode=require"),
            "postgres://m2m:********@db.internal:5433/fleet?sslmode=require"
        );
    }

    #[test]
    fn platform_services_are_checked_against_the_documented_names() {
        let settings = Settings::load_with_environment(
            None,
            environment(&[("M2M_PLATFORM__SERVICES", "CarrierService, DeviceService")]),
        )
        .unwrap();
        assert_eq!(
            settings.platform.services,
            ["CarrierService", "DeviceService"]
        );
        let error = Settings::load_with_environment(
            None,
            environment(&[("M2M_PLATFORM__SERVICES", "CarrierService,carrierservice")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("platform.services[1]") && error.contains("did you mean CarrierService"),
            "{error}"
        );
    }

    #[test]
    fn a_periodic_platform_check_needs_the_whole_link_and_secrets_are_masked() {
        let error = Settings::load_with_environment(
            None,
            environment(&[("M2M_PLATFORM__CHECK_INTERVAL_S", "60")]),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("platform.client_id"), "{error}");
        let settings = Settings::load_with_environment(
            None,
            environment(&[
                ("M2M_PLATFORM__CHECK_INTERVAL_S", "60"),
                ("M2M_PLATFORM__CLIENT_ID", "app-key"),
                ("M2M_PLATFORM__CLIENT_SECRET", "Client-Secret-Very-Secret"),
                ("M2M_PLATFORM__USERNAME", "uws-user"),
                ("M2M_PLATFORM__PASSWORD", "Uws-Password-Very-Secret"),
                ("M2M_PLATFORM__ACCOUNT", "0342077109-00001"),
                (
                    "M2M_PLATFORM__CALLBACK_URL",
                    "http://listener.example:9001/",
                ),
                ("M2M_PLATFORM__SERVICES", "CarrierService"),
            ]),
        )
        .unwrap();
        let shown = settings.to_masked_toml();
        assert!(!shown.contains("Very-Secret"), "{shown}");
        assert!(shown.contains("client_id = \"app-key\""), "{shown}");
        let warnings = settings.platform.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("platform.callback_url"),
            "{warnings:?}"
        );
    }
}
