//! `kms-server dev --servers 2` from one command: two servers on one PostgreSQL store and one
//! network HSM; a key made through one is used through the other; and stopping the dev process
//! stops everything it started (the second server, the network HSM, PostgreSQL).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kms_e2e::binary;

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

fn kmsctl(dir: &std::path::Path, who: &str, endpoint: &str, args: &[&str]) -> std::process::Output {
    Command::new(binary("kmsctl"))
        .env_clear()
        .env("KMS_ENDPOINT", endpoint)
        .env("KMS_CA", dir.join("ca.crt"))
        .env("KMS_CERT", dir.join(format!("{who}.crt")))
        .env("KMS_KEY", dir.join(format!("{who}.key")))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn two_dev_servers_share_one_store_and_stop_together() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    // Two consecutive free ports: a free one whose successor is free too.
    let port = (0..50)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port())
        .find(|p| *p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok())
        .expect("two consecutive free ports");
    let log_path = tmp.path().join("dev.log");
    let ready = tmp.path().join("ready");
    let mut dev = Command::new(binary("kms-server"))
        .args(["dev", "--servers", "2", "--listen", &format!("127.0.0.1:{port}"), "--ready-file"])
        .arg(&ready)
        .arg("--dir")
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let started = Instant::now();
    while !ready.exists() || !log().contains("dev server started server=2") {
        assert!(dev.try_wait().unwrap().is_none(), "kms-server dev exited:\n{}", log());
        assert!(started.elapsed() < Duration::from_secs(60), "not ready within 60 s:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid_of_second: u32 = log()
        .lines()
        .find(|l| l.contains("dev server started server=2"))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("the second server's pid in the log");
    let (one, two) = (format!("https://localhost:{port}"), format!("https://localhost:{}", port + 1));
    assert!(log().contains(&format!("KMS_ENDPOINT={one},{two}")), "{}", log());

    // A key made through server 1 is used through server 2 (once it listens).
    let made = kmsctl(&dir, "officer", &one, &["key", "create", "--name", "tax", "--level", "PERSONAL"]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let mut generated = kmsctl(&dir, "exchange", &two, &["datakey", "generate", "--key", "tax"]);
    while !generated.status.success() && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
        generated = kmsctl(&dir, "exchange", &two, &["datakey", "generate", "--key", "tax"]);
    }
    assert!(generated.status.success(), "{}", String::from_utf8_lossy(&generated.stderr));
    assert!(String::from_utf8_lossy(&generated.stdout).contains("key_version         1"));

    // Stopping the dev process stops what it started.
    let postmaster: u32 = std::fs::read_to_string(tmp.path().join("dev-pg/data/postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid_of_second) && alive(postmaster));
    Command::new("kill").arg("-TERM").arg(dev.id().to_string()).status().unwrap();
    let stopping = Instant::now();
    while dev.try_wait().unwrap().is_none() {
        assert!(stopping.elapsed() < Duration::from_secs(30), "kms-server dev did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(pid_of_second), "the second server was stopped");
    assert!(!alive(postmaster), "PostgreSQL was stopped");
}
