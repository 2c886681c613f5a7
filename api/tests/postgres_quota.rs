//! `--quota-backend-bytes` on the PostgreSQL backend, driven by the real etcdctl as etcd's e2e
//! TestCtlV3Alarm does, with its quota (13 bbolt pages, 53,248 bytes: the quota counts the
//! bytes of Cairn's rows, not its tables' pages, which take ~144 KiB when empty): puts until
//! "database space exceeded", the NOSPACE alarm listed and persisted, `/health` false, puts
//! refused while the alarm is on, then compact, defrag, `alarm disarm` and a put that
//! succeeds.

mod common;

use std::io::{Read, Write};

use common::process::{ctl, start, try_ctl, Cairn};

fn http_get(s: &Cairn, path: &str) -> String {
    let mut c = std::net::TcpStream::connect(&s.endpoint).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn nospace_alarm_on_postgres() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(cairn_postgres::testing::server().create_database()).expect("create a database");
    let quota = (13 * 4096).to_string();
    let a = start("a", &["--backend", "postgres", "--postgres-url", &url, "--quota-backend-bytes", &quota]);
    // A second process on the same database, running before the alarm is raised.
    let b = start("b", &["--backend", "postgres", "--postgres-url", &url, "--quota-backend-bytes", &quota]);
    assert_eq!(ctl(&a, &["put", "1st_test", &"a".repeat(64)]), "OK\n", "a small put fits");
    let member = ctl(&a, &["member", "list", "-w", "json"]);
    let member: serde_json::Value = serde_json::from_str(&member).unwrap();
    let id = member["members"][0]["ID"].as_u64().unwrap();

    // 4 KiB values PostgreSQL cannot compress, until the quota refuses one
    let mut n: u64 = 0;
    let err = loop {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (n + 1);
        let value: String = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'a' + (x % 26) as u8)
            })
            .collect();
        let (ok, _, err) = try_ctl(&a, &["put", "2nd_test", &value]);
        if !ok {
            break err;
        }
        n += 1;
        assert!(n < 100, "400 KiB written under a 52 KiB quota");
    };
    assert!(err.contains("etcdserver: mvcc: database space exceeded"), "{err}");
    println!("{n} puts of 4 KiB before NOSPACE");

    assert_eq!(ctl(&a, &["alarm", "list"]), format!("memberID:{id} alarm:NOSPACE \n"));
    let health = http_get(&a, "/health");
    assert!(health.starts_with("HTTP/1.1 503") && health.contains(r#"{"health":"false""#), "{health}");
    let (ok, _, err) = try_ctl(&a, &["put", "3rd_test", "small"]);
    assert!(!ok && err.contains("database space exceeded"), "a put is refused while the alarm is on: {err}");

    // The process that was already running learns of the alarm (within its 1 s refresh) and
    // refuses puts too.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while ctl(&b, &["alarm", "list"]) != format!("memberID:{id} alarm:NOSPACE \n") {
        assert!(std::time::Instant::now() < deadline, "b never saw a's NOSPACE alarm");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (ok, _, err) = try_ctl(&b, &["put", "3rd_test", "small"]);
    assert!(!ok && err.contains("database space exceeded"), "{err}");
    // The alarm is persisted: a process started now lists it and refuses puts.
    let c = start("c", &["--backend", "postgres", "--postgres-url", &url, "--quota-backend-bytes", &quota]);
    assert_eq!(ctl(&c, &["alarm", "list"]), format!("memberID:{id} alarm:NOSPACE \n"));
    let (ok, _, err) = try_ctl(&c, &["put", "3rd_test", "small"]);
    assert!(!ok && err.contains("database space exceeded"), "{err}");
    drop(c);

    let status: serde_json::Value = serde_json::from_str(&ctl(&a, &["endpoint", "status", "-w", "json"])).unwrap();
    let rev = status[0]["Status"]["header"]["revision"].as_i64().unwrap();
    ctl(&a, &["compact", &rev.to_string(), "--physical"]);
    ctl(&a, &["defrag"]);
    // What is left: 1st_test, 2nd_test's last two versions (the one before the compact
    // revision stays as prev_kv) and its live row, the alarm and member documents.
    let status: serde_json::Value = serde_json::from_str(&ctl(&a, &["endpoint", "status", "-w", "json"])).unwrap();
    let in_use = status[0]["Status"]["dbSizeInUse"].as_i64().unwrap();
    println!("dbSizeInUse {in_use} B after compact and defrag");
    assert!(in_use < 13 * 4096 / 2, "compaction gave the space back: {in_use} B");
    // still refused until the alarm is disarmed, as in etcd
    let (ok, _, _) = try_ctl(&a, &["put", "4th_test", "small"]);
    assert!(!ok, "the alarm refuses puts until it is disarmed");
    assert_eq!(ctl(&a, &["alarm", "disarm"]), format!("memberID:{id} alarm:NOSPACE \n"));
    assert_eq!(ctl(&a, &["alarm", "list"]), "");
    assert_eq!(ctl(&a, &["put", "4th_test", &"a".repeat(64)]), "OK\n", "a put below the quota after compact + defrag");
    let health = http_get(&a, "/health");
    assert!(health.starts_with("HTTP/1.1 200") && health.contains(r#"{"health":"true""#), "{health}");
    // ... and b learns that it was disarmed through a.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !ctl(&b, &["alarm", "list"]).is_empty() {
        assert!(std::time::Instant::now() < deadline, "b never saw the alarm disarmed");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(ctl(&b, &["put", "5th_test", "small"]), "OK\n");
}
