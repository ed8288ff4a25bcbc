//! `simulate --platform-listen ADDR`: the platform's REST side (PLATFORM.md §3), for tests and
//! demos of `m2m-listener platform ...`, and the callbacks that follow a registration.
//!
//! It serves the OAuth token (client credentials, Basic auth; the same token within its
//! lifetime), the session login (five consecutive failed logins lock the account; an idle session
//! expires with `REQUEST_FAILED.SessionToken.Expired`), logout, and the callback list, register and
//! deregister endpoints, with the platform's error bodies (400 `errorCode`/`errorMessage`, the
//! gateway's 401 `fault` 900901/900902). Every `--callback-interval-ms` it posts one REST callback
//! to each registered service's URL with the credentials registered for it, and, like the real
//! platform, keeps using the previous password for `--previous-password-ms` after a
//! re-registration. `GET /simulator/stats` tells what it saw (the tests count logins with it).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::distr::{Alphanumeric, SampleString};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::payloads::{self, CarrierResult, Envelope};

#[derive(Clone, Debug, clap::Args)]
pub struct PlatformOptions {
    /// Play the platform's REST side on this address (token, session, callback registration),
    /// and send callbacks to whatever is registered there, until stopped (or --duration-s).
    #[arg(long, value_name = "ADDR")]
    pub platform_listen: Option<SocketAddr>,
    /// The OAuth key the simulated platform accepts.
    #[arg(long, default_value = "sim-client-id")]
    pub platform_client_id: String,
    #[arg(long, default_value = "sim-client-secret")]
    pub platform_client_secret: String,
    /// The UWS login the simulated platform accepts.
    #[arg(long, default_value = "sim-uws-user")]
    pub platform_username: String,
    #[arg(long, default_value = "sim-uws-password")]
    pub platform_password: String,
    /// The billing account whose callbacks it manages.
    #[arg(long, default_value = "0000000001-00001")]
    pub platform_account: String,
    /// How long an OAuth token lives (the platform: one hour).
    #[arg(long, default_value_t = 3_600_000)]
    pub token_lifetime_ms: u64,
    /// A session unused this long expires (the platform: 20 minutes).
    #[arg(long, default_value_t = 1_200_000)]
    pub session_idle_ms: u64,
    /// Consecutive failed logins that lock the account (the platform: 5).
    #[arg(long, default_value_t = 5)]
    pub lockout_after: u32,
    /// After a re-registration, callbacks still carry the previous password this long (the
    /// platform: 9-14 minutes).
    #[arg(long, default_value_t = 600_000)]
    pub previous_password_ms: u64,
    /// One callback per registered service this often.
    #[arg(long, default_value_t = 1_000)]
    pub callback_interval_ms: u64,
    /// Stop after this many seconds (0: at Ctrl-C).
    #[arg(long, default_value_t = 0)]
    pub duration_s: u64,
}

impl Default for PlatformOptions {
    fn default() -> Self {
        Self {
            platform_listen: None,
            platform_client_id: "sim-client-id".to_owned(),
            platform_client_secret: "sim-client-secret".to_owned(),
            platform_username: "sim-uws-user".to_owned(),
            platform_password: "sim-uws-password".to_owned(),
            platform_account: "0000000001-00001".to_owned(),
            token_lifetime_ms: 3_600_000,
            session_idle_ms: 1_200_000,
            lockout_after: 5,
            previous_password_ms: 600_000,
            callback_interval_ms: 1_000,
            duration_s: 0,
        }
    }
}

/// What the simulated platform saw and did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PlatformStats {
    pub token_requests: u64,
    /// Every login attempt, failed or not.
    pub logins: u64,
    pub failed_logins: u64,
    pub locked: bool,
    pub registrations: u64,
    pub deregistrations: u64,
    pub callbacks_sent: u64,
    pub callbacks_acknowledged: u64,
    /// Answered 4xx (403: the listener refused the credentials).
    pub callbacks_refused: u64,
    /// Not answered, or answered 5xx.
    pub callbacks_failed: u64,
    /// Callbacks sent with a password replaced by a later registration.
    pub sent_with_previous_password: u64,
    /// Acknowledged callbacks sent with the currently registered password.
    pub acknowledged_with_current_password: u64,
}

/// One service's registration, as the platform holds it.
#[derive(Clone, Debug)]
pub struct HeldRegistration {
    pub url: String,
    pub username: String,
    pub password: String,
    /// The credentials of the registration this one replaced, still used until then.
    previous: Option<(String, String, Instant)>,
}

struct Inner {
    token: Option<(String, Instant)>,
    /// Session token → last use.
    sessions: HashMap<String, Instant>,
    consecutive_failures: u32,
    registrations: BTreeMap<String, HeldRegistration>,
    stats: PlatformStats,
    next_callback: u64,
    /// Every access and session token handed out (for tests that check they leak nowhere).
    issued: Vec<String>,
}

struct State {
    options: PlatformOptions,
    inner: Mutex<Inner>,
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(inner) => inner,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// A running simulated platform; stops when dropped.
pub struct PlatformSimulator {
    state: Arc<State>,
    address: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl PlatformSimulator {
    /// Serves on `listener` and starts sending callbacks to what gets registered.
    pub fn start(options: PlatformOptions, listener: TcpListener) -> std::io::Result<Self> {
        let address = listener.local_addr()?;
        let state = Arc::new(State {
            options,
            inner: Mutex::new(Inner {
                token: None,
                sessions: HashMap::new(),
                consecutive_failures: 0,
                registrations: BTreeMap::new(),
                stats: PlatformStats::default(),
                next_callback: 0,
                issued: Vec::new(),
            }),
        });
        let server = tokio::spawn(serve(Arc::clone(&state), listener));
        let sender = tokio::spawn(send_callbacks(Arc::clone(&state)));
        Ok(Self {
            state,
            address,
            tasks: vec![server, sender],
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The base URL of both the OAuth and the M2M endpoints.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn stats(&self) -> PlatformStats {
        self.state.lock().stats.clone()
    }

    /// Every access and session token it handed out.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.state.lock().issued.clone()
    }

    pub fn registration(&self, service: &str) -> Option<HeldRegistration> {
        self.state.lock().registrations.get(service).cloned()
    }

    /// Registers `service` as someone else would (at once: no previous password kept).
    pub fn set_registration(&self, service: &str, url: &str, username: &str, password: &str) {
        self.state.lock().registrations.insert(
            service.to_owned(),
            HeldRegistration {
                url: url.to_owned(),
                username: username.to_owned(),
                password: password.to_owned(),
                previous: None,
            },
        );
    }

    pub fn remove_registration(&self, service: &str) {
        self.state.lock().registrations.remove(service);
    }
}

impl Drop for PlatformSimulator {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// `simulate --platform-listen`: runs until Ctrl-C or `duration_s`, then returns what it saw.
pub async fn run(options: PlatformOptions) -> anyhow::Result<PlatformStats> {
    let address = options
        .platform_listen
        .ok_or_else(|| anyhow::anyhow!("--platform-listen is required"))?;
    let listener = TcpListener::bind(address)
        .await
        .map_err(|error| anyhow::anyhow!("cannot listen on {address}: {error}"))?;
    let duration = options.duration_s;
    let simulator = PlatformSimulator::start(options, listener)?;
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "simulated platform on {}: set platform.oauth_url and platform.m2m_url to it\n",
            simulator.url()
        )
        .as_bytes(),
    );
    let stop = crate::startup::shutdown_signal()?;
    if duration > 0 {
        tokio::select! {
            _ = stop => {},
            _ = tokio::time::sleep(Duration::from_secs(duration)) => {},
        }
    } else {
        stop.await;
    }
    Ok(simulator.stats())
}

async fn serve(state: Arc<State>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, std::convert::Infallible>(handle(&state, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Answer = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: &Value) -> Answer {
    let text = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn platform_error(code: &str, message: &str) -> Answer {
    reply(
        StatusCode::BAD_REQUEST,
        &json!({"errorCode": code, "errorMessage": message}),
    )
}

fn gateway_fault(code: &str, message: &str) -> Answer {
    reply(
        StatusCode::UNAUTHORIZED,
        &json!({"fault": {"code": code, "message": message, "description": message}}),
    )
}

fn header_text<'a>(request: &'a Request<hyper::body::Incoming>, name: &str) -> Option<&'a str> {
    request
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
}

async fn handle(state: &State, request: Request<hyper::body::Incoming>) -> Answer {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let authorization = header_text(&request, "authorization").map(str::to_owned);
    let session = header_text(&request, "vz-m2m-token").map(str::to_owned);
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let options = &state.options;
    if method == Method::GET && path == "/simulator/stats" {
        return reply(StatusCode::OK, &json!(state.lock().stats));
    }
    if method == Method::POST && path == "/oauth2/token" {
        let mut inner = state.lock();
        inner.stats.token_requests += 1;
        let Some(basic) = authorization
            .as_deref()
            .and_then(|value| value.strip_prefix("Basic "))
        else {
            return gateway_fault("900902", "Missing Credentials");
        };
        let expected = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            options.platform_client_id, options.platform_client_secret
        ));
        let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
        if basic.trim() != expected {
            return gateway_fault("900901", "Invalid Credentials");
        }
        if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
            return platform_error("invalid_grant", "grant_type must be client_credentials");
        }
        let lifetime = Duration::from_millis(options.token_lifetime_ms);
        let now = Instant::now();
        let token = match &inner.token {
            Some((token, issued)) if now.duration_since(*issued) < lifetime => token.clone(),
            _ => {
                let token = random_token();
                inner.issued.push(token.clone());
                inner.token = Some((token.clone(), now));
                token
            }
        };
        return reply(
            StatusCode::OK,
            &json!({"access_token": token, "token_type": "bearer", "expires_in": lifetime.as_secs(), "scope": "default"}),
        );
    }
    // Everything else passes the gateway with the bearer token.
    {
        let inner = state.lock();
        let Some(bearer) = authorization
            .as_deref()
            .and_then(|value| value.strip_prefix("Bearer "))
        else {
            return gateway_fault("900902", "Missing Credentials");
        };
        let valid = inner.token.as_ref().is_some_and(|(token, issued)| {
            token == bearer.trim()
                && issued.elapsed() < Duration::from_millis(options.token_lifetime_ms)
        });
        if !valid {
            return gateway_fault("900901", "Invalid Credentials");
        }
    }
    let json_body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if method == Method::POST && path == "/v1/session/login" {
        let mut inner = state.lock();
        inner.stats.logins += 1;
        if inner.stats.locked {
            inner.stats.failed_logins += 1;
            return platform_error(
                "UnifiedWebService.REQUEST_FAILED.UserLocked",
                "The user is locked. Contact support to unlock it.",
            );
        }
        let right = json_body["username"].as_str() == Some(options.platform_username.as_str())
            && json_body["password"].as_str() == Some(options.platform_password.as_str());
        if !right {
            inner.stats.failed_logins += 1;
            inner.consecutive_failures += 1;
            if inner.consecutive_failures >= options.lockout_after {
                inner.stats.locked = true;
            }
            return platform_error(
                "UnifiedWebService.REQUEST_FAILED.InvalidCredentials",
                "Invalid username or password.",
            );
        }
        inner.consecutive_failures = 0;
        let token = random_token();
        inner.issued.push(token.clone());
        inner.sessions.insert(token.clone(), Instant::now());
        return reply(StatusCode::OK, &json!({"sessionToken": token}));
    }
    // Everything else needs a session.
    {
        let mut inner = state.lock();
        let Some(session) = session.as_deref() else {
            return platform_error(
                "REQUEST_FAILED.SessionToken.Missing",
                "VZ-M2M-Token is required.",
            );
        };
        let idle = Duration::from_millis(options.session_idle_ms);
        match inner.sessions.get(session).copied() {
            None => {
                return platform_error(
                    "REQUEST_FAILED.SessionToken.Invalid",
                    "The session token is not valid.",
                );
            }
            Some(last) if last.elapsed() >= idle => {
                inner.sessions.remove(session);
                return platform_error(
                    "REQUEST_FAILED.SessionToken.Expired",
                    "The session token has expired.",
                );
            }
            Some(_) => {
                inner.sessions.insert(session.to_owned(), Instant::now());
            }
        }
        if method == Method::POST && path == "/v1/session/logout" {
            inner.sessions.remove(session);
            return reply(StatusCode::OK, &json!({"sessionToken": session}));
        }
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let account = options.platform_account.as_str();
    let not_this_account = || {
        platform_error(
            "REQUEST_FAILED.Account.NotFound",
            "The account does not exist or is not yours.",
        )
    };
    match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "callbacks", requested]) => {
            if decoded(requested) != account {
                return not_this_account();
            }
            let inner = state.lock();
            if inner.registrations.is_empty() {
                return reply(StatusCode::OK, &Value::Null);
            }
            let list: Vec<Value> = inner
                .registrations
                .iter()
                .map(|(service, registration)| {
                    json!({
                        "accountName": account,
                        "serviceName": service,
                        "url": registration.url,
                        "username": registration.username,
                        "password": registration.password,
                    })
                })
                .collect();
            reply(StatusCode::OK, &Value::Array(list))
        }
        (&Method::POST, ["v1", "callbacks", requested]) => {
            if decoded(requested) != account {
                return not_this_account();
            }
            let Some(name) = json_body["name"].as_str() else {
                return platform_error("INPUT_INVALID.name", "name is required.");
            };
            if !crate::platform::CALLBACK_SERVICES.contains(&name) {
                return platform_error(
                    "INPUT_INVALID.ServiceName.Invalid",
                    "The service name is not valid.",
                );
            }
            let Some(url) = json_body["url"]
                .as_str()
                .filter(|url| url.starts_with("http"))
            else {
                return platform_error("INPUT_INVALID.url", "url is required.");
            };
            let username = json_body["username"].as_str().unwrap_or_default();
            let password = json_body["password"].as_str().unwrap_or_default();
            if username.chars().count() > 40 || password.chars().count() > 40 {
                return platform_error(
                    "INPUT_INVALID.Credentials.TooLong",
                    "username and password are at most 40 characters.",
                );
            }
            let mut inner = state.lock();
            inner.stats.registrations += 1;
            let lag = Duration::from_millis(options.previous_password_ms);
            let previous = inner
                .registrations
                .get(name)
                .filter(|old| old.username != username || old.password != password)
                .map(|old| {
                    (
                        old.username.clone(),
                        old.password.clone(),
                        Instant::now() + lag,
                    )
                });
            inner.registrations.insert(
                name.to_owned(),
                HeldRegistration {
                    url: url.to_owned(),
                    username: username.to_owned(),
                    password: password.to_owned(),
                    previous,
                },
            );
            reply(
                StatusCode::OK,
                &json!({"accountName": account, "serviceName": name}),
            )
        }
        (&Method::DELETE, ["v1", "callbacks", requested, "name", service]) => {
            if decoded(requested) != account {
                return not_this_account();
            }
            let service = decoded(service);
            let mut inner = state.lock();
            if inner.registrations.remove(&service).is_none() {
                return platform_error(
                    "REQUEST_FAILED.Callback.NotRegistered",
                    "No callback is registered for the service.",
                );
            }
            inner.stats.deregistrations += 1;
            reply(
                StatusCode::OK,
                &json!({"accountName": account, "serviceName": service}),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            &json!({"errorCode": "REQUEST_FAILED.NotFound", "errorMessage": "No such resource."}),
        ),
    }
}

fn decoded(segment: &str) -> String {
    form_urlencoded::parse(format!("x={segment}").as_bytes())
        .next()
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default()
}

fn random_token() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 32)
}

/// Every `callback_interval_ms`, one REST carrier callback to each registered service.
async fn send_callbacks(state: Arc<State>) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut ticks = tokio::time::interval(Duration::from_millis(
        state.options.callback_interval_ms.max(1),
    ));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let targets: Vec<(String, String, String, bool, u64)> = {
            let mut inner = state.lock();
            let now = Instant::now();
            let mut targets = Vec::new();
            let services: Vec<String> = inner.registrations.keys().cloned().collect();
            for service in services {
                inner.next_callback += 1;
                let number = inner.next_callback;
                let Some(registration) = inner.registrations.get_mut(&service) else {
                    continue;
                };
                if registration
                    .previous
                    .as_ref()
                    .is_some_and(|(_, _, until)| *until <= now)
                {
                    registration.previous = None;
                }
                let (username, password, previous) = match &registration.previous {
                    Some((username, password, _)) => (username.clone(), password.clone(), true),
                    None => (
                        registration.username.clone(),
                        registration.password.clone(),
                        false,
                    ),
                };
                targets.push((
                    registration.url.clone(),
                    username,
                    password,
                    previous,
                    number,
                ));
            }
            targets
        };
        for (url, username, password, previous, number) in targets {
            let Ok(uri) = url.parse::<hyper::Uri>() else {
                continue;
            };
            if uri.scheme_str() != Some("http") {
                // This simulator speaks plain HTTP only; a TLS URL is left to the real platform.
                continue;
            }
            let request_id = format!("platform-sim-{number}");
            let imei = format!("99{number:013}");
            let mdn = format!("5{number:09}");
            let body = payloads::json_carrier_callback(
                Envelope {
                    username: &username,
                    password: &password,
                    callback_count: 1,
                    max_callback_threshold: 4,
                },
                &request_id,
                &[("IMEI", imei.as_str())],
                CarrierResult::Activated { mdn: &mdn },
            );
            let request = Request::builder()
                .method(Method::POST)
                .uri(uri)
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::USER_AGENT, "Verizon's callback service")
                .body(Full::new(Bytes::from(body)));
            let Ok(request) = request else { continue };
            let status = tokio::time::timeout(Duration::from_secs(10), client.request(request))
                .await
                .ok()
                .and_then(Result::ok)
                .map(|response| response.status());
            let mut inner = state.lock();
            inner.stats.callbacks_sent += 1;
            if previous {
                inner.stats.sent_with_previous_password += 1;
            }
            match status {
                Some(status) if status.is_success() => {
                    inner.stats.callbacks_acknowledged += 1;
                    if !previous {
                        inner.stats.acknowledged_with_current_password += 1;
                    }
                }
                Some(status) if status.is_client_error() => inner.stats.callbacks_refused += 1,
                _ => inner.stats.callbacks_failed += 1,
            }
        }
    }
}
