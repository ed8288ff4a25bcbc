//! Starts the real listener on port 0 with a temporary database, and talks to it over HTTP.

use std::path::PathBuf;

use m2m_listener::configuration::{CredentialSettings, Settings};
use m2m_listener::domain::Secret;
use m2m_listener::startup::Application;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestApp {
    pub callback_url: String,
    pub api_url: String,
    pub database_path: PathBuf,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    /// Holds the database directory until the test ends.
    pub directory: tempfile::TempDir,
}

/// The pairs every test app accepts: the empty pair of the seed 004 example, the `test` pair of the
/// seed 001 example, and a rotation pair.
pub fn test_credentials() -> Vec<CredentialSettings> {
    [
        ("", "", None),
        ("test", "test", Some("seed-account")),
        ("fleet-ops", "s3cret-rotation-A", None),
        ("fleet-ops", "s3cret-rotation-B", None),
    ]
    .into_iter()
    .map(|(username, password, account)| CredentialSettings {
        username: username.to_owned(),
        password: Secret::new(password),
        account: account.map(str::to_owned),
    })
    .collect()
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(customise: impl FnOnce(&mut Settings)) -> TestApp {
    let directory = tempfile::tempdir().expect("temporary directory");
    let mut settings = Settings::default();
    settings.callback.listen = "127.0.0.1:0".parse().expect("address");
    settings.api.listen = "127.0.0.1:0".parse().expect("address");
    settings.storage.path = directory.path().join("m2m-listener.db");
    settings.callback.credentials = test_credentials();
    settings.shutdown.drain_timeout_s = 5;
    customise(&mut settings);
    settings.validate().expect("test settings are valid");

    let application = Application::build(&settings)
        .await
        .expect("application builds");
    let callback_url = format!(
        "http://{}/",
        application.callback_address().expect("callback address")
    );
    let api_url = format!("http://{}", application.api_address().expect("api address"));
    let database_path = application.database_path().to_owned();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(application.run_until_stopped(async {
        let _ = stopped.await;
    }));
    TestApp {
        callback_url,
        api_url,
        database_path,
        client: reqwest::Client::new(),
        stop: Some(stop),
        server: Some(server),
        directory,
    }
}

pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// A fixture with its `CallbackCount` set to `count`.
pub fn with_callback_count(name: &str, count: u32) -> Vec<u8> {
    let body = String::from_utf8(fixture(name)).expect("UTF-8 fixture");
    let start = body
        .find("<CallbackCount>")
        .expect("fixture has a CallbackCount")
        + "<CallbackCount>".len();
    let end = start + body[start..].find('<').expect("closing tag");
    format!("{}{count}{}", &body[..start], &body[end..]).into_bytes()
}

impl TestApp {
    pub async fn post_callback(&self, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(&self.callback_url)
            .header("Content-Type", "text/xml; charset=utf-8")
            .body(body)
            .send()
            .await
            .expect("callback request sent")
    }

    pub async fn get_api(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.api_url))
            .send()
            .await
            .expect("API request sent")
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let response = self.get_api(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        serde_json::from_slice(&response.bytes().await.expect("body")).expect("JSON body")
    }

    /// A read-only connection to the real database file.
    pub fn database(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(
            &self.database_path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("database opens")
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.database()
            .query_row(sql, [], |row| row.get(0))
            .expect(sql)
    }

    /// Sends `body` with chunked transfer encoding (no Content-Length) over a raw connection and
    /// returns the raw response head.
    pub async fn post_chunked(&self, body: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = self
            .callback_url
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let mut request = format!(
            "POST / HTTP/1.1\r\nHost: {address}\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        for chunk in body.chunks(500) {
            request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            request.extend_from_slice(chunk);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"0\r\n\r\n");
        // The server may answer 413 and close before reading everything: ignore write errors.
        let _ = stream.write_all(&request).await;
        let mut response = vec![0u8; 4096];
        let read = stream.read(&mut response).await.unwrap_or(0);
        String::from_utf8_lossy(&response[..read]).into_owned()
    }

    /// Stops the server the way SIGTERM does, waits for it, and hands back the database directory.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("server task")
                .expect("server stopped cleanly");
        }
        let placeholder = tempfile::tempdir().expect("temporary directory");
        std::mem::replace(&mut self.directory, placeholder)
    }
}

/// What a carrier-service callback reports for its device.
pub enum CarrierResult<'a> {
    Activated { mdn: &'a str },
    Failed { code: &'a str, message: &'a str },
}

/// An activation callback in the SOAP envelope form of seed 004, for one device named by
/// `devices` (kind, identifier) pairs.
pub fn carrier_callback(
    request_id: &str,
    devices: &[(&str, &str)],
    result: CarrierResult<'_>,
) -> String {
    let devices: String = devices
        .iter()
        .map(|(kind, id)| {
            format!("<Device><Kind>{kind}</Kind><Identifier>{id}</Identifier></Device>")
        })
        .collect();
    let (service, fault, status) = match result {
        CarrierResult::Activated { mdn } => (
            format!(
                "<CarrierService><ChangeDeviceState><Activate>\
                 <DeviceIdentifierCollection><Kind>mdn</Kind><Identifier>{mdn}</Identifier></DeviceIdentifierCollection>\
                 <IpAddress>10.1.2.3</IpAddress><State>Active</State><ServicePlan>M2M_4G</ServicePlan>\
                 <DeviceCredential><Username>{mdn}@vzw3g.com</Username><Password>device-secret-{mdn}</Password></DeviceCredential>\
                 </Activate><Deactivate xsi:nil=\"true\"/></ChangeDeviceState></CarrierService>"
            ),
            "<Fault xsi:nil=\"true\"/>".to_owned(),
            "Success",
        ),
        CarrierResult::Failed { code, message } => (
            "<CarrierService xsi:nil=\"true\"/>".to_owned(),
            format!(
                "<Fault><faultcode>{code}</faultcode><faultstring>{message}</faultstring></Fault>"
            ),
            "Failed",
        ),
    };
    format!(
        "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\">\
         <s:Body xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">\
         <CallbackRequest xmlns=\"http://nphase.com/unifiedwebservice/v2\"><Username/><Password/>\
         <RequestId>{request_id}</RequestId>{devices}<Data><Data>{service}<PromoChange xsi:nil=\"true\"/>{fault}\
         <Comment xsi:nil=\"true\"/><Status>{status}</Status><CallbackCount>1</CallbackCount>\
         <MaxCallbackThreshold>4</MaxCallbackThreshold></Data></Data></CallbackRequest></s:Body></s:Envelope>"
    )
}

/// An upload callback in the `CallbackRequest1` form of seed 001: `lines` are (ICCID, IMEI, line
/// status); `counts` are (total, pending, success, failed).
pub fn upload_callback(
    request_id: &str,
    lines: &[(&str, &str, &str)],
    counts: (u32, u32, u32, u32),
) -> String {
    let lines: String = lines
        .iter()
        .map(|(iccid, imei, status)| {
            format!(
                "<UploadDevicesInfo><DeviceIdentifier><Kind>Iccid </Kind><Identifier>{iccid} </Identifier></DeviceIdentifier>\
                 <DeviceIdentifier><Kind>Imei </Kind><Identifier>{imei} </Identifier></DeviceIdentifier>\
                 <LineStatus>{status} </LineStatus></UploadDevicesInfo>"
            )
        })
        .collect();
    let (total, pending, success, failed) = counts;
    format!(
        "<CallbackRequest1 xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"><CallbackRequest>\
         <Username xmlns=\"http://nphase.com/unifiedwebservice/v2\">test </Username>\
         <Password xmlns=\"http://nphase.com/unifiedwebservice/v2\">test </Password>\
         <RequestId xmlns=\"http://nphase.com/unifiedwebservice/v2\">{request_id} </RequestId>\
         <Data xmlns=\"http://nphase.com/unifiedwebservice/v2\"><Data><CarrierService xsi:nil=\"true\" />\
         <DeviceService><UploadDevices>{lines}<AccountName>acct </AccountName><DeviceSku>SKU1 </DeviceSku>\
         <TotalLineCount>{total} </TotalLineCount><PendingLineCount>{pending} </PendingLineCount>\
         <FailedLineCount>{failed} </FailedLineCount><SuccessLineCount>{success} </SuccessLineCount>\
         </UploadDevices></DeviceService><Fault xsi:nil=\"true\" /><Status xsi:nil=\"true\" />\
         <CallbackCount>1 </CallbackCount><MaxCallbackThreshold>4 </MaxCallbackThreshold></Data></Data>\
         </CallbackRequest></CallbackRequest1>"
    )
}

impl TestApp {
    pub async fn register(&self, registration: serde_json::Value) -> reqwest::Response {
        self.client
            .post(format!("{}/api/v1/jobs", self.api_url))
            .header("Content-Type", "application/json")
            .body(registration.to_string())
            .send()
            .await
            .expect("registration sent")
    }
}
