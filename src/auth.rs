//! Callback authentication: which username/password pairs are accepted, and the generated pair
//! used when none is configured.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::configuration::CredentialSettings;
use crate::domain::Secret;

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
}

/// The pair that matched, for the delivery record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authenticated {
    pub account: Option<String>,
}

impl Authenticator {
    pub fn new(credentials: &[CredentialSettings]) -> Self {
        let entries = credentials
            .iter()
            .map(|credential| Entry {
                username_digest: digest(credential.username.as_bytes()),
                password_digest: digest(credential.password.expose().as_bytes()),
                account: credential.account.clone(),
            })
            .collect();
        Self { entries }
    }

    /// The matching pair, or `None`. Every entry is compared, so timing reveals neither which entry
    /// matched nor how much of a guess was right. Surrounding white space is ignored, as the
    /// platform pads values (`test ` in the upload example).
    pub fn verify(&self, username: &str, password: &Secret) -> Option<Authenticated> {
        let username = digest(username.trim().as_bytes());
        let password = digest(password.expose().trim().as_bytes());
        let mut matched: Option<&Entry> = None;
        for entry in &self.entries {
            let same =
                entry.username_digest.ct_eq(&username) & entry.password_digest.ct_eq(&password);
            if bool::from(same) && matched.is_none() {
                matched = Some(entry);
            }
        }
        matched.map(|entry| Authenticated {
            account: entry.account.clone(),
        })
    }
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
}
