//! Any bytes as a callback body, posted to a real listener (real SQLite file, in a temporary
//! directory): the answer must never be a 5xx, and nothing may panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use m2m_listener::configuration::{CredentialSettings, Settings, Synchronous};
use m2m_listener::domain::Secret;
use m2m_listener::startup::Application;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Listener {
    runtime: tokio::runtime::Runtime,
    address: std::net::SocketAddr,
    _directory: tempfile::TempDir,
}

fn listener() -> &'static Listener {
    static LISTENER: OnceLock<Listener> = OnceLock::new();
    LISTENER.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let directory = tempfile::tempdir().unwrap();
        let mut settings = Settings::default();
        settings.callback.listen = "127.0.0.1:0".parse().unwrap();
        settings.api.listen = "127.0.0.1:0".parse().unwrap();
        settings.storage.path = directory.path().join("fuzz.db");
        // Durability is not what is fuzzed here; speed is welcome.
        settings.storage.synchronous = Synchronous::Normal;
        // The empty pair of seed 004, so that fuzzed callbacks get past authentication.
        settings.callback.credentials =
            vec![CredentialSettings { username: String::new(), password: Secret::new(""), account: None }];
        let application = runtime.block_on(Application::build(&settings)).unwrap();
        let address = application.callback_address().unwrap();
        runtime.spawn(application.run_until_stopped(std::future::pending()));
        Listener { runtime, address, _directory: directory }
    })
}

fuzz_target!(|body: &[u8]| {
    let listener = listener();
    let answer = listener.runtime.block_on(async {
        let mut stream = tokio::net::TcpStream::connect(listener.address).await.unwrap();
        let head = format!("POST / HTTP/1.1\r\nHost: fuzz\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        answer
    });
    let status = answer.get(9..12).map(|code| String::from_utf8_lossy(code).into_owned()).unwrap_or_default();
    assert!(!status.starts_with('5'), "answered {status} to a {}-byte body", body.len());
});
