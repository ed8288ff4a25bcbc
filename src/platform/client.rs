//! The platform's REST API, as PLATFORM.md §3 documents it: an OAuth client-credentials token,
//! a session login, and the callback registration endpoints, each call with
//! `Authorization: Bearer` and `VZ-M2M-Token`.
//!
//! One login per client: the session is reused while valid and renewed only on the platform's
//! expiry error. A failed login is never retried, by this client or by anyone using it: five
//! failed logins in a row lock the account until the vendor's support unlocks it.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use super::Registration;
use crate::configuration::PlatformSettings;
use crate::domain::Secret;

/// The platform's error code of an idle session (its service prefix aside).
const SESSION_EXPIRED: &str = "SessionToken.Expired";

#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// A 4xx/5xx with the platform's `{"errorCode", "errorMessage"}`.
    #[error("the platform answered HTTP {status}: {code}: {message}")]
    Platform {
        status: u16,
        code: String,
        message: String,
    },
    /// The API gateway's `{"fault": {"code", "message"}}` (900901: invalid credentials, 900902:
    /// missing credentials).
    #[error("the platform's API gateway answered HTTP {status}: fault {code}: {message}")]
    Gateway {
        status: u16,
        code: String,
        message: String,
    },
    /// Any other answer; the body is not shown (it may hold what it should not).
    #[error(
        "the platform answered HTTP {status} to {what} ({length} bytes, not a platform error body)"
    )]
    Unexpected {
        what: &'static str,
        status: u16,
        length: usize,
    },
    #[error("cannot reach the platform for {what}: {source}")]
    Transport {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The OAuth token request failed: platform.client_id / client_secret.
    #[error(
        "the OAuth token request failed (check platform.client_id and platform.client_secret): {0}"
    )]
    Token(Box<PlatformError>),
    /// The session login failed; never retried.
    #[error(
        "the session login failed (check platform.username and platform.password): {0}; not \
         retried: five failed logins in a row lock the account until support unlocks it"
    )]
    Login(Box<PlatformError>),
    /// A login already failed on this client: it does not try again.
    #[error("not logging in again: this command's one login already failed")]
    LoginAlreadyFailed,
}

impl PlatformError {
    /// Whether this is (or wraps) a refused login.
    pub fn is_login_failure(&self) -> bool {
        matches!(
            self,
            PlatformError::Login(_) | PlatformError::LoginAlreadyFailed
        )
    }

    fn platform_code(&self) -> Option<&str> {
        match self {
            PlatformError::Platform { code, .. } => Some(code),
            _ => None,
        }
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client of one account's callback registrations.
pub struct PlatformClient {
    http: HttpsClient,
    settings: PlatformSettings,
    access_token: Option<Secret>,
    session_token: Option<Secret>,
    /// Set by the first failed login: no later call logs in.
    login_failed: bool,
}

impl PlatformClient {
    pub fn new(settings: &PlatformSettings) -> anyhow::Result<Self> {
        // The binary's one crypto provider (ring), and the system's trust; `http://` URLs are
        // accepted too (tests, a local proxy: the settings warn about them). No redirect is
        // followed.
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_platform_verifier(rustls::crypto::ring::default_provider())
            .map_err(|error| anyhow::anyhow!("cannot set up TLS for the platform: {error}"))?
            .https_or_http()
            .enable_http1()
            .build();
        let http = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            http,
            settings: settings.clone(),
            access_token: None,
            session_token: None,
            login_failed: false,
        })
    }

    fn m2m(&self, path: &str) -> String {
        format!("{}{path}", self.settings.m2m_url.trim_end_matches('/'))
    }

    fn account_path(&self) -> String {
        form_urlencoded::byte_serialize(self.settings.account.as_bytes()).collect()
    }

    async fn token(&mut self) -> Result<Secret, PlatformError> {
        if let Some(token) = &self.access_token {
            return Ok(token.clone());
        }
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            self.settings.client_id,
            self.settings.client_secret.expose()
        ));
        let url = format!(
            "{}/oauth2/token",
            self.settings.oauth_url.trim_end_matches('/')
        );
        let response = self
            .send(
                Method::POST,
                &url,
                &[
                    (header::AUTHORIZATION, format!("Basic {basic}")),
                    (
                        header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded".to_owned(),
                    ),
                ],
                "grant_type=client_credentials".to_owned(),
                "the OAuth token",
            )
            .await?;
        let body = answer(response, "the OAuth token")
            .map_err(|error| PlatformError::Token(Box::new(error)))?;
        let token = body["access_token"]
            .as_str()
            .filter(|token| !token.is_empty())
            .ok_or(PlatformError::Token(Box::new(PlatformError::Unexpected {
                what: "the OAuth token",
                status: 200,
                length: 0,
            })))?;
        let token = Secret::new(token);
        self.access_token = Some(token.clone());
        Ok(token)
    }

    /// Logs in, once: a failure is remembered and never retried.
    async fn login(&mut self) -> Result<Secret, PlatformError> {
        if self.login_failed {
            return Err(PlatformError::LoginAlreadyFailed);
        }
        let token = self.token().await?;
        let body = json!({
            "username": self.settings.username,
            "password": self.settings.password.expose(),
        });
        let sent = self
            .send(
                Method::POST,
                &self.m2m("/v1/session/login"),
                &[
                    (header::AUTHORIZATION, format!("Bearer {}", token.expose())),
                    (header::CONTENT_TYPE, "application/json".to_owned()),
                ],
                body.to_string(),
                "the session login",
            )
            .await;
        // Whatever happened (even a lost answer), the attempt may have counted on the platform.
        let answered = sent.and_then(|response| answer(response, "the session login"));
        let session = answered.and_then(|body| {
            body["sessionToken"]
                .as_str()
                .filter(|token| !token.is_empty())
                .map(Secret::new)
                .ok_or(PlatformError::Unexpected {
                    what: "the session login",
                    status: 200,
                    length: 0,
                })
        });
        match session {
            Ok(session) => {
                self.session_token = Some(session.clone());
                Ok(session)
            }
            Err(error) => {
                self.login_failed = true;
                Err(PlatformError::Login(Box::new(error)))
            }
        }
    }

    /// One call with the session; on the expiry error, one new login and the call again.
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Value>,
        what: &'static str,
    ) -> Result<Value, PlatformError> {
        let mut renewed = false;
        loop {
            let session = match &self.session_token {
                Some(session) => session.clone(),
                None => self.login().await?,
            };
            let token = self.token().await?;
            let response = self
                .send(
                    method.clone(),
                    &self.m2m(path),
                    &[
                        (header::AUTHORIZATION, format!("Bearer {}", token.expose())),
                        (
                            header::HeaderName::from_static("vz-m2m-token"),
                            session.expose().to_owned(),
                        ),
                        (header::CONTENT_TYPE, "application/json".to_owned()),
                    ],
                    body.as_ref().map(Value::to_string).unwrap_or_default(),
                    what,
                )
                .await?;
            match answer(response, what) {
                Err(error)
                    if !renewed
                        && error
                            .platform_code()
                            .is_some_and(|code| code.ends_with(SESSION_EXPIRED)) =>
                {
                    tracing::info!("the platform session expired; logging in again");
                    self.session_token = None;
                    renewed = true;
                }
                done => return done,
            }
        }
    }

    /// Every callback registration of the account (`[]` for an empty answer).
    pub async fn list(&mut self) -> Result<Vec<Registration>, PlatformError> {
        let path = format!("/v1/callbacks/{}", self.account_path());
        let body = self
            .call(Method::GET, &path, None, "the callback list")
            .await?;
        let text = |entry: &Value, key: &str| entry[key].as_str().unwrap_or_default().to_owned();
        Ok(body
            .as_array()
            .into_iter()
            .flatten()
            .map(|entry| Registration {
                service: text(entry, "serviceName"),
                url: text(entry, "url"),
                username: text(entry, "username"),
                password: Secret::new(text(entry, "password")),
            })
            .collect())
    }

    /// Registers (replaces) `service`'s URL and credentials.
    pub async fn register(
        &mut self,
        service: &str,
        url: &str,
        username: &str,
        password: &Secret,
    ) -> Result<(), PlatformError> {
        let path = format!("/v1/callbacks/{}", self.account_path());
        let body = json!({
            "name": service,
            "url": url,
            "username": username,
            "password": password.expose(),
        });
        self.call(Method::POST, &path, Some(body), "the callback registration")
            .await
            .map(drop)
    }

    pub async fn deregister(&mut self, service: &str) -> Result<(), PlatformError> {
        let path = format!(
            "/v1/callbacks/{}/name/{}",
            self.account_path(),
            form_urlencoded::byte_serialize(service.as_bytes()).collect::<String>()
        );
        self.call(Method::DELETE, &path, None, "the callback deregistration")
            .await
            .map(drop)
    }

    /// Ends the session, if there is one (best effort: it expires by itself).
    pub async fn logout(&mut self) {
        let (Some(session), Some(token)) = (self.session_token.take(), self.access_token.clone())
        else {
            return;
        };
        let _ = self
            .send(
                Method::POST,
                &self.m2m("/v1/session/logout"),
                &[
                    (header::AUTHORIZATION, format!("Bearer {}", token.expose())),
                    (
                        header::HeaderName::from_static("vz-m2m-token"),
                        session.expose().to_owned(),
                    ),
                    (header::CONTENT_TYPE, "application/json".to_owned()),
                ],
                String::new(),
                "the logout",
            )
            .await;
    }

    /// One request, answered (status and body) within `platform.request_timeout_s`.
    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(header::HeaderName, String)],
        body: String,
        what: &'static str,
    ) -> Result<(StatusCode, Bytes), PlatformError> {
        let transport = |source: Box<dyn std::error::Error + Send + Sync>| {
            PlatformError::Transport { what, source }
        };
        let mut request = Request::builder().method(method).uri(url).header(
            header::USER_AGENT,
            concat!("m2m-listener/", env!("CARGO_PKG_VERSION")),
        );
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|error| transport(Box::new(error)))?;
        let timeout = Duration::from_secs(self.settings.request_timeout_s);
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|error| transport(Box::new(error)))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|error| transport(Box::new(error)))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| transport(format!("no answer within {} s", timeout.as_secs()).into()))?
    }
}

/// The JSON body of a 2xx answer (`null` for an empty one), or the platform's error.
fn answer(
    (status, bytes): (StatusCode, Bytes),
    what: &'static str,
) -> Result<Value, PlatformError> {
    let body: Option<Value> = serde_json::from_slice(&bytes).ok();
    if status.is_success() {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        return body.ok_or(PlatformError::Unexpected {
            what,
            status: status.as_u16(),
            length: bytes.len(),
        });
    }
    let shown = |value: &Value| match value {
        Value::String(text) => text.chars().take(300).collect(),
        Value::Null => String::new(),
        other => other.to_string().chars().take(300).collect(),
    };
    if let Some(body) = &body {
        if let Some(code) = body.get("errorCode") {
            return Err(PlatformError::Platform {
                status: status.as_u16(),
                code: shown(code),
                message: shown(&body["errorMessage"]),
            });
        }
        if let Some(fault) = body.get("fault") {
            return Err(PlatformError::Gateway {
                status: status.as_u16(),
                code: shown(&fault["code"]),
                message: shown(&fault["message"]),
            });
        }
    }
    Err(PlatformError::Unexpected {
        what,
        status: status.as_u16(),
        length: bytes.len(),
    })
}
