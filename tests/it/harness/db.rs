//! Per-test databases cloned from a migrated template, and cleanup of Redis prefixes.

use std::time::Duration;

use diesel::{QueryableByName, sql_types::Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

fn admin_url() -> String {
    std::env::var("DEVGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

fn url_for(db: &str) -> String {
    let admin = admin_url();
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{db}")
}

/// The template is named after a checksum of the migrations, so changing a migration makes
/// a new template instead of reusing a stale one; older templates are dropped when a new one
/// is made (unless another test run still uses them).
fn template_name() -> String {
    let mut files: Vec<_> = walk(&super::manifest_dir().join("migrations"));
    files.sort();
    let mut hasher = crc32fast::Hasher::new();
    for f in files {
        hasher.update(f.to_string_lossy().as_bytes());
        hasher.update(&std::fs::read(&f).unwrap());
    }
    // The month too: the migrations create request-log partitions from the current month on.
    let month = chrono::Utc::now().format("%Y%m");
    format!("devgate_tmpl_{month}_{:08x}", hasher.finalize())
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path))
        } else {
            out.push(path)
        }
    }
    out
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    datname: String,
}

/// A database of its own for one test; dropped (with FORCE) when the value is dropped.
pub struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let template = template_name();
        let mut admin = AsyncPgConnection::establish(&admin_url())
            .await
            .expect("connect to the admin database");
        // Serialise template creation across parallel tests and test processes.
        diesel::sql_query("SELECT pg_advisory_lock(727272)")
            .execute(&mut admin)
            .await
            .unwrap();
        let exists: Vec<Name> =
            diesel::sql_query("SELECT datname FROM pg_database WHERE datname = $1")
                .bind::<Text, _>(&template)
                .load(&mut admin)
                .await
                .unwrap();
        if exists.is_empty() {
            let building = format!("{template}_building");
            diesel::sql_query(format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"))
                .execute(&mut admin)
                .await
                .unwrap();
            diesel::sql_query(format!("CREATE DATABASE {building}"))
                .execute(&mut admin)
                .await
                .unwrap();
            devgate::db::migrate(&url_for(&building).into())
                .await
                .expect("migrate the template");
            diesel::sql_query(format!("ALTER DATABASE {building} RENAME TO {template}"))
                .execute(&mut admin)
                .await
                .unwrap();
            let stale: Vec<Name> = diesel::sql_query(
                "SELECT datname FROM pg_database WHERE datname LIKE 'devgate\\_tmpl\\_%' AND datname <> $1",
            )
            .bind::<Text, _>(&template)
            .load(&mut admin)
            .await
            .unwrap();
            for old in stale {
                // Without FORCE: a template another run is cloning from stays.
                let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {}", old.datname))
                    .execute(&mut admin)
                    .await;
            }
        }
        diesel::sql_query("SELECT pg_advisory_unlock(727272)")
            .execute(&mut admin)
            .await
            .unwrap();

        let name = format!("devgate_test_{}", Uuid::new_v4().simple());
        // CREATE DATABASE ... TEMPLATE fails while another session is connected to the
        // template (a concurrent clone); retry briefly.
        let mut attempts = 0;
        loop {
            match diesel::sql_query(format!("CREATE DATABASE {name} TEMPLATE {template}"))
                .execute(&mut admin)
                .await
            {
                Ok(_) => break,
                Err(e) if attempts < 50 => {
                    attempts += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot create test database: {e}"),
            }
        }
        TestDb {
            url: url_for(&name),
            name,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime; do the async work on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(mut admin) = AsyncPgConnection::establish(&admin_url()).await {
                    let _ =
                        diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .execute(&mut admin)
                            .await;
                }
            });
        })
        .join();
    }
}

/// Deletes every Redis key under `prefix`.
pub fn delete_redis_prefix(prefix: &str) {
    let Ok(client) = redis::Client::open(super::redis_url()) else {
        return;
    };
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut conn)
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
    }
}
