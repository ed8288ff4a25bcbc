//! Callback authentication: which username/password pairs are accepted, and the generated pair
//! used when none is configured.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::configuration::CredentialSettings;
use crate::domain::Secret;
use crate::storage::Store;
use crate::storage::credentials::{SOURCE_ROTATED, StoredCredential, password_digest};

/// Checks callback credentials in constant time against every accepted pair.
#[derive(Clone)]
pub struct Authenticator {
    entries: Vec<Entry>,
}

#[derive(Clone)]
struct Entry {
    /// Digests, so that comparison time does not depend on where or whether lengths differ.
    username_digest: [u8; 32],
    password_digest: [u8; 32],
    account: Option<String>,
    /// Accepted until then (a pair retired by `platform rotate`, in its overlap); `None`: always.
    valid_until: Option<String>,
}

/// The pair that matched, for the delivery record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authenticated {
    pub account: Option<String>,
}

impl Authenticator {
    pub fn new(credentials: &[CredentialSettings]) -> Self {
        Self::with_stored(credentials, &[])
    }

    /// The configured pairs and those `platform rotate` stored: a configured pair a rotation
    /// retired is accepted until the end of its overlap, a stored pair until its own.
    pub fn with_stored(configured: &[CredentialSettings], stored: &[StoredCredential]) -> Self {
        let mut entries: Vec<Entry> = configured
            .iter()
            .map(|credential| {
                let username_digest = digest(credential.username.as_bytes());
                let password_digest = password_digest(credential.password.expose());
                let retired = stored.iter().find(|row| {
                    row.username == credential.username && row.password_digest == password_digest
                });
                Entry {
                    username_digest,
                    password_digest,
                    account: credential.account.clone(),
                    valid_until: retired.and_then(|row| row.valid_until.clone()),
                }
            })
            .collect();
        entries.extend(
            stored
                .iter()
                .filter(|row| row.source == SOURCE_ROTATED)
                .map(|row| Entry {
                    username_digest: digest(row.username.as_bytes()),
                    password_digest: row.password_digest,
                    account: row.account.clone(),
                    valid_until: row.valid_until.clone(),
                }),
        );
        Self { entries }
    }

    /// The matching pair, or `None`. Every entry is compared, so timing reveals neither which entry
    /// matched nor how much of a guess was right. Surrounding white space is ignored, as the
    /// platform pads values (`test ` in the upload example).
    pub fn verify(&self, username: &str, password: &Secret) -> Option<Authenticated> {
        self.verify_at(
            username,
            password,
            &crate::storage::timestamp(OffsetDateTime::now_utc()),
        )
    }

    /// [`Self::verify`] at `now` (as [`crate::storage::timestamp`] writes it).
    pub fn verify_at(&self, username: &str, password: &Secret, now: &str) -> Option<Authenticated> {
        let username = digest(username.trim().as_bytes());
        let password = digest(password.expose().trim().as_bytes());
        let mut matched: Option<&Entry> = None;
        for entry in &self.entries {
            let same =
                entry.username_digest.ct_eq(&username) & entry.password_digest.ct_eq(&password);
            let valid = entry.valid_until.as_deref().is_none_or(|until| until > now);
            if bool::from(same) && valid && matched.is_none() {
                matched = Some(entry);
            }
        }
        matched.map(|entry| Authenticated {
            account: entry.account.clone(),
        })
    }
}

/// The smallest gap between two reads of the stored credentials that an unknown pair causes. A
/// callback with an unknown pair waits for the next read (at most this long) instead of being
/// refused: short, so that a sender repeating a wrong password is not slowed much, and long
/// enough to bound the reads a flood of wrong passwords causes (one in flight, ten a second).
const MISS_REFRESH_SPACING: Duration = Duration::from_millis(100);

/// The accepted pairs of a serving listener: those of the configuration file (or the generated
/// pair) and those in the database, read again every `platform.credentials_refresh_ms` and
/// whenever a callback presents a pair the last read did not know (at most ten times a second, waiting
/// for it rather than refusing), so that a pair rotated by any replica or command is accepted on
/// its first use. A retired pair's end of overlap is checked on every callback against the clock.
pub struct CallbackCredentials {
    /// The pairs of the configuration file, or the generated one.
    configured: Vec<CredentialSettings>,
    /// Where rotated pairs are; `None`: the configured pairs only (tests, tools).
    store: Option<Arc<dyn Store>>,
    /// The pairs last read, and when that read started.
    current: std::sync::RwLock<Arc<(Authenticator, Instant)>>,
    /// One read at a time; holds when the last one started (successful or not).
    refreshing: tokio::sync::Mutex<Instant>,
}

impl CallbackCredentials {
    /// The configured pairs alone (no database).
    pub fn fixed(configured: &[CredentialSettings]) -> Self {
        let now = Instant::now();
        Self {
            configured: configured.to_vec(),
            store: None,
            current: std::sync::RwLock::new(Arc::new((Authenticator::new(configured), now))),
            refreshing: tokio::sync::Mutex::new(now),
        }
    }

    /// The configured pairs and those of `store`, read now (a failed read is logged and leaves
    /// the configured pairs; the next refresh tries again).
    pub async fn load(configured: &[CredentialSettings], store: Arc<dyn Store>) -> Self {
        let mut credentials = Self::fixed(configured);
        credentials.store = Some(store);
        let started = Instant::now()
            .checked_sub(MISS_REFRESH_SPACING)
            .unwrap_or_else(Instant::now);
        *credentials.refreshing.get_mut() = started;
        credentials.reload().await;
        credentials
    }

    fn snapshot(&self) -> Arc<(Authenticator, Instant)> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The pairs as last read.
    pub fn authenticator(&self) -> Authenticator {
        self.snapshot().0.clone()
    }

    /// Reads the stored pairs again (the periodic refresh).
    pub async fn reload(&self) {
        let mut last = self.refreshing.lock().await;
        self.read_stored(&mut last).await;
    }

    async fn read_stored(&self, last: &mut Instant) {
        let Some(store) = &self.store else { return };
        let started = Instant::now();
        *last = started;
        match store.callback_credentials().await {
            Ok(stored) => {
                let authenticator = Authenticator::with_stored(&self.configured, &stored);
                let fresh = Arc::new((authenticator, started));
                match self.current.write() {
                    Ok(mut current) => *current = fresh,
                    Err(poisoned) => *poisoned.into_inner() = fresh,
                }
            }
            Err(error) => tracing::warn!(
                error = %crate::telemetry::ErrorChain(&error),
                "cannot read the rotated callback credentials; using those read before"
            ),
        }
    }

    /// The matching pair for a callback received at `received`, or `None`. An unknown pair makes
    /// the stored pairs be read again unless a read started after `received`.
    pub async fn verify(
        &self,
        username: &str,
        password: &Secret,
        received: Instant,
    ) -> Option<Authenticated> {
        let snapshot = self.snapshot();
        let now = crate::storage::timestamp(OffsetDateTime::now_utc());
        if let Some(matched) = snapshot.0.verify_at(username, password, &now) {
            return Some(matched);
        }
        if self.store.is_none() || snapshot.1 >= received {
            return None;
        }
        {
            let mut last = self.refreshing.lock().await;
            if self.snapshot().1 < received {
                let earliest = *last + MISS_REFRESH_SPACING;
                if Instant::now() < earliest {
                    tokio::time::sleep_until(earliest.into()).await;
                }
                self.read_stored(&mut last).await;
            }
        }
        let now = crate::storage::timestamp(OffsetDateTime::now_utc());
        self.snapshot().0.verify_at(username, password, &now)
    }
}

/// The pair `platform register` sends: the current rotated pair if there is one, else the first
/// configured pair (or the generated one).
pub fn current_pair(
    configured: &[CredentialSettings],
    stored: &[StoredCredential],
) -> Option<CredentialSettings> {
    stored
        .iter()
        .rev()
        .find(|row| row.source == SOURCE_ROTATED && row.valid_until.is_none())
        .and_then(|row| {
            row.password.as_ref().map(|password| CredentialSettings {
                username: row.username.clone(),
                password: password.clone(),
                account: row.account.clone(),
            })
        })
        .or_else(|| configured.first().cloned())
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Where the accepted credentials came from; the caller tells the operator.
#[derive(Debug)]
pub enum CredentialSource {
    /// `[[callback.credentials]]` entries.
    Configured(usize),
    /// A pair generated on an earlier start, read from this file.
    Stored(PathBuf),
    /// A pair generated now and saved to `path`: print it once, so it can be used in
    /// `RegisterCallback`.
    Generated {
        path: PathBuf,
        username: String,
        password: Secret,
    },
}

/// The first configured pair, or the generated one if it exists; generates nothing. For tools that
/// post callbacks to this listener (`simulate`).
pub fn existing_credentials(
    configured: &[CredentialSettings],
    generated_path: &Path,
) -> Option<CredentialSettings> {
    configured
        .first()
        .cloned()
        .or_else(|| read_generated(generated_path).ok())
}

fn read_generated(path: &Path) -> anyhow::Result<CredentialSettings> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "failed to read generated credentials from {}",
            path.display()
        )
    })?;
    toml::from_str(&text).with_context(|| {
        format!(
            "failed to parse generated credentials in {}",
            path.display()
        )
    })
}

/// The configured credentials, or (none configured) the pair stored at `generated_path`, generated
/// and saved there on first start.
pub fn resolve_credentials(
    configured: &[CredentialSettings],
    generated_path: &Path,
) -> anyhow::Result<(Vec<CredentialSettings>, CredentialSource)> {
    if !configured.is_empty() {
        return Ok((
            configured.to_vec(),
            CredentialSource::Configured(configured.len()),
        ));
    }
    if generated_path.exists() {
        crate::private_files::warn_if_shared(generated_path, "generated credentials file");
        let stored = read_generated(generated_path)?;
        return Ok((
            vec![stored],
            CredentialSource::Stored(generated_path.to_owned()),
        ));
    }

    let mut random = rand::rng();
    let username = format!("m2m-{}", Alphanumeric.sample_string(&mut random, 12));
    let password = Secret::new(Alphanumeric.sample_string(&mut random, 32));
    save_generated(generated_path, &username, &password)?;
    let credential = CredentialSettings {
        username: username.clone(),
        password: password.clone(),
        account: None,
    };
    Ok((
        vec![credential],
        CredentialSource::Generated {
            path: generated_path.to_owned(),
            username,
            password,
        },
    ))
}

fn save_generated(path: &Path, username: &str, password: &Secret) -> anyhow::Result<()> {
    if let Some(directory) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        crate::private_files::create_directory_all(directory)
            .with_context(|| format!("failed to create directory {}", directory.display()))?;
    }
    let mut file = crate::private_files::create_new(path)
        .with_context(|| format!("failed to create {}", path.display()))?;
    let text = format!(
        "# Generated by m2m-listener on first start. Register these with RegisterCallback,\n\
         # or configure [[callback.credentials]] and delete this file.\n\
         username = {}\npassword = {}\n",
        toml_string(username),
        toml_string(password.expose())
    );
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("failed to write {}", path.display()))
}

fn toml_string(value: &str) -> String {
    toml::Value::String(value.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(username: &str, password: &str, account: Option<&str>) -> CredentialSettings {
        CredentialSettings {
            username: username.to_owned(),
            password: Secret::new(password),
            account: account.map(str::to_owned),
        }
    }

    #[test]
    fn any_configured_pair_is_accepted_and_nothing_else() {
        let authenticator = Authenticator::new(&[
            pair("ops", "old-password", Some("A")),
            pair("ops", "new-password", Some("B")),
        ]);
        assert_eq!(
            authenticator
                .verify("ops", &Secret::new("old-password"))
                .unwrap()
                .account
                .as_deref(),
            Some("A")
        );
        assert_eq!(
            authenticator
                .verify("ops ", &Secret::new("new-password "))
                .unwrap()
                .account
                .as_deref(),
            Some("B")
        );
        assert!(authenticator.verify("ops", &Secret::new("wrong")).is_none());
        assert!(
            authenticator.verify("", &Secret::new("")).is_none(),
            "empty only when configured"
        );
        assert!(
            authenticator
                .verify("other", &Secret::new("old-password"))
                .is_none()
        );
    }

    #[test]
    fn empty_credentials_are_accepted_when_configured() {
        let authenticator = Authenticator::new(&[pair("", "", None)]);
        assert!(authenticator.verify("", &Secret::new("")).is_some());
        assert!(authenticator.verify("x", &Secret::new("")).is_none());
    }

    #[test]
    fn a_generated_pair_is_saved_privately_and_reused() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory
            .path()
            .join("sub")
            .join("callback-credentials.toml");
        let (first, source) = resolve_credentials(&[], &path).unwrap();
        let CredentialSource::Generated {
            username, password, ..
        } = source
        else {
            panic!("not generated")
        };
        assert!(
            username.len() <= 40 && password.expose().len() <= 40 && password.expose().len() >= 32
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let (second, source) = resolve_credentials(&[], &path).unwrap();
        assert!(matches!(source, CredentialSource::Stored(_)));
        assert_eq!(first[0].username, second[0].username);
        assert_eq!(first[0].password, second[0].password);
    }

    #[test]
    fn a_pair_retired_by_a_rotation_is_accepted_until_its_overlap_ends_and_the_rotated_one_after() {
        use crate::storage::credentials::{SOURCE_RETIRED, StoredCredential};
        let configured = [pair("ops", "configured-password", None)];
        let stored = [
            StoredCredential {
                username: "ops".to_owned(),
                password_digest: password_digest("configured-password"),
                password: None,
                account: None,
                source: SOURCE_RETIRED.to_owned(),
                created_at: "2026-12-01T00:00:00.000000Z".to_owned(),
                valid_until: Some("2026-12-02T00:00:00.000000Z".to_owned()),
            },
            StoredCredential {
                username: "ops".to_owned(),
                password_digest: password_digest("rotated-password"),
                password: Some(Secret::new("rotated-password")),
                account: Some("A".to_owned()),
                source: SOURCE_ROTATED.to_owned(),
                created_at: "2026-12-01T00:00:00.000000Z".to_owned(),
                valid_until: None,
            },
        ];
        let authenticator = Authenticator::with_stored(&configured, &stored);
        let before = "2026-12-01T23:59:59.999999Z";
        let after = "2026-12-02T00:00:00.000000Z";
        let old = Secret::new("configured-password");
        let new = Secret::new("rotated-password");
        assert!(authenticator.verify_at("ops", &old, before).is_some());
        assert!(authenticator.verify_at("ops", &old, after).is_none());
        assert_eq!(
            authenticator
                .verify_at("ops", &new, after)
                .unwrap()
                .account
                .as_deref(),
            Some("A")
        );
        let current = current_pair(&configured, &stored).unwrap();
        assert_eq!(current.password.expose(), "rotated-password");
        assert_eq!(
            current_pair(&configured, &[]).unwrap().password.expose(),
            "configured-password"
        );
    }
}
