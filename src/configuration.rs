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
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallbackSettings {
    /// Where the platform posts callbacks. 9001 is one of the ports it accepts.
    pub listen: SocketAddr,
    /// Larger bodies are refused with 413. A 10,000-device upload callback is about 3 MB.
    pub max_body_bytes: u64,
    /// Memory for callback bodies in flight (read, checked, parsed, waiting for their commit),
    /// all connections together. Past it a new body waits up to `inflight_wait_ms`, then is
    /// answered 503 (the platform retries) instead of being read.
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
    #[serde(deserialize_with = "list_or_indexed_map")]
    pub allowed_sources: Vec<String>,
    /// Proxies whose `X-Forwarded-For` names the client; from anyone else it is ignored.
    #[serde(deserialize_with = "list_or_indexed_map")]
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
    /// As registered with `RegisterCallback`; empty only if registered empty.
    pub username: String,
    pub password: Secret,
    /// A label for the billing account this pair belongs to, kept on each delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    /// The query API, `/readyz` and `/metrics`. Loopback by default: it is for operators.
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

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Durable across power loss: the default, because an acknowledged callback is never re-sent.
    #[default]
    Full,
    /// Durable across process crashes, not power loss, in WAL mode.
    Normal,
}

impl Synchronous {
    pub fn pragma_value(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
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

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    pub format: LogFormat,
    /// A tracing filter (`info`, `m2m_listener=debug`...); `RUST_LOG` wins when set.
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
            .map_err(|error| SettingsError(format!("invalid configuration: {error}")))?;
        settings.validate()?;
        Ok(settings)
    }

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
                return fail(key, "must be at least 1".to_owned());
            }
        }
        if !(1..=100_000).contains(&self.callback.max_connections) {
            return fail(
                "callback.max_connections",
                "must be from 1 to 100000".to_owned(),
            );
        }
        if !(8..=1_000).contains(&self.callback.max_headers) {
            return fail("callback.max_headers", "must be from 8 to 1000".to_owned());
        }
        self.callback.source_policy()?;
        if self.callback.max_body_bytes < 1024 {
            return fail(
                "callback.max_body_bytes",
                "must be at least 1024".to_owned(),
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
                format!("must be from 1 to {}", crate::jobs::MAX_TIMEOUT_S),
            );
        }
        if self.jobs.sweep_interval_ms < 10 {
            return fail("jobs.sweep_interval_ms", "must be at least 10".to_owned());
        }
        if self.storage.retention_days == 0 {
            return fail("storage.retention_days", "must be at least 1".to_owned());
        }
        if self.storage.prune_interval_s == 0 {
            return fail("storage.prune_interval_s", "must be at least 1".to_owned());
        }
        if !(1..=10_000).contains(&self.storage.max_batch) {
            return fail(
                "storage.max_batch",
                "must be between 1 and 10000".to_owned(),
            );
        }
        if let Some(url) = self.storage.postgres_url() {
            // The parser's message never repeats the URL (and with it the password).
            if let Err(error) = url.parse::<tokio_postgres::Config>() {
                return fail("storage.url", format!("is not a PostgreSQL URL: {error}"));
            }
        }
        if !(2..=1_000).contains(&self.storage.pool_size) {
            return fail("storage.pool_size", "must be from 2 to 1000".to_owned());
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

/// A list from a file (`[[callback.credentials]]`), or from the environment, where the config crate
/// turns `M2M_CALLBACK__CREDENTIALS__0__USERNAME` into a map keyed by the index.
fn list_or_indexed_map<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrMap<T> {
        List(Vec<T>),
        Map(std::collections::BTreeMap<String, T>),
    }
    match ListOrMap::deserialize(deserializer)? {
        ListOrMap::List(list) => Ok(list),
        ListOrMap::Map(map) => {
            let mut indexed = Vec::with_capacity(map.len());
            for (key, value) in map {
                let index: usize = key.parse().map_err(|_| {
                    serde::de::Error::custom(format!("expected a list index, found key {key:?}"))
                })?;
                indexed.push((index, value));
            }
            indexed.sort_by_key(|(index, _)| *index);
            Ok(indexed.into_iter().map(|(_, value)| value).collect())
        }
    }
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
}
