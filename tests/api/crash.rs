//! SIGKILL at a random moment under load: every acknowledged callback survives, the database
//! stays intact. Repeated several times per run.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{RngExt, SeedableRng};

use crate::helpers::{fixture, free_port, listener_process, wait_until_ready};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_callback_is_lost_across_repeated_sigkills() {
    let directory = tempfile::tempdir().unwrap();
    let database = directory.path().join("data").join("m2m-listener.db");
    let (callback_port, api_port) = (free_port(), free_port());
    let template = String::from_utf8(fixture("deactivate_bare.xml")).unwrap();
    let acknowledged: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|now| now.as_nanos() as u64)
        .unwrap_or(7);
    let mut random = rand::rngs::StdRng::seed_from_u64(seed);
    let client = reqwest::Client::new();

    for round in 0..5 {
        let mut listener = listener_process(
            directory.path(),
            callback_port,
            api_port,
            "fleet-ops",
            "s3cret-rotation-A",
        );
        wait_until_ready(api_port).await;
        let mut senders = tokio::task::JoinSet::new();
        for worker in 0..8 {
            let (client, template, acknowledged) =
                (client.clone(), template.clone(), Arc::clone(&acknowledged));
            let url = format!("http://127.0.0.1:{callback_port}/");
            senders.spawn(async move {
                for sequence in 0..100_000 {
                    let request_id = format!("crash-{round}-{worker}-{sequence}");
                    let body =
                        template.replace("7d1c1f0e-5b7a-4a8e-9f57-1c0c7f3e2a11", &request_id);
                    match client.post(&url).body(body).send().await {
                        Ok(response) if response.status() == 200 => {
                            acknowledged.lock().unwrap().insert(request_id);
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(random.random_range(150..700))).await;
        listener.kill().unwrap();
        listener.wait().unwrap();
        senders.join_all().await;

        let stored: BTreeSet<String> = {
            let connection = rusqlite::Connection::open(&database).unwrap();
            let integrity: String = connection
                .query_row("PRAGMA integrity_check", [], |row| row.get(0))
                .unwrap();
            assert_eq!(integrity, "ok", "round {round}");
            let mut statement = connection
                .prepare("SELECT request_id FROM deliveries WHERE result = 'stored'")
                .unwrap();
            statement
                .query_map([], |row| row.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let acknowledged = acknowledged.lock().unwrap().clone();
        let lost: Vec<&String> = acknowledged.difference(&stored).collect();
        assert!(
            !acknowledged.is_empty(),
            "round {round} acknowledged nothing before the kill"
        );
        assert!(
            lost.is_empty(),
            "round {round} (seed {seed}): {} acknowledged callbacks lost, e.g. {:?}",
            lost.len(),
            lost.first()
        );
    }
}
