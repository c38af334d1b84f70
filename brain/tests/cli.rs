//! The `corral-brain` binary as an operator uses it.
// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use corral_brain::tls::Credentials;
use corral_brain::PeerIdentity;
use corral_proto::CellId;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn brain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_corral-brain"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn certs_init_and_issue() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let d = dir.to_str().unwrap();

    let o = brain(&["certs", "init", "--dir", d]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mode = |name: &str| {
        std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("ca-key.pem"), 0o600);

    let o = brain(&[
        "certs", "issue", "--dir", d, "--cell", "web-1", "--days", "7",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(mode("cell-web-1-key.pem"), 0o600);
    let o = brain(&["certs", "issue", "--dir", d, "--brain", "b1"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // What was written is usable as it is.
    let who = PeerIdentity::Cell(CellId::new("web-1").unwrap());
    let creds = Credentials::from_dir(&dir, &who).unwrap();
    assert_eq!(creds.identity(), &who);
    corral_brain::tls::client_config(&creds, None).unwrap();

    // Nothing is overwritten without --force.
    let before = std::fs::read(dir.join("cell-web-1.pem")).unwrap();
    let o = brain(&["certs", "issue", "--dir", d, "--cell", "web-1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cell-web-1.pem already exists; pass --force to replace it"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(dir.join("cell-web-1.pem")).unwrap(), before);
    let o = brain(&["certs", "init", "--dir", d]);
    assert_eq!(o.status.code(), Some(1));
    let o = brain(&["certs", "issue", "--dir", d, "--cell", "web-1", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(std::fs::read(dir.join("cell-web-1.pem")).unwrap(), before);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    assert!(brain(&["certs", "init", "--dir", d]).status.success());
    let count = || std::fs::read_dir(tmp.path()).unwrap().count();
    let before = count();

    let o = brain(&["certs", "issue", "--dir", d, "--cell", "../evil"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cell id \"../evil\" must start"),
        "{}",
        stderr(&o)
    );
    let o = brain(&["certs", "issue", "--dir", d, "--cell", "a", "--brain", "b"]);
    assert_eq!(o.status.code(), Some(2));
    let o = brain(&["certs", "issue", "--dir", d]);
    assert_eq!(o.status.code(), Some(2));
    let o = brain(&["certs", "issue", "--dir", d, "--cell", "a", "--days", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(count(), before);

    let o = brain(&["certs", "issue", "--dir", "/nonexistent", "--cell", "a"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!Path::new("/nonexistent").exists());
}

#[test]
fn the_brain_checks_its_configuration_before_running() {
    let o = brain(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--config"), "{}", stderr(&o));

    // A configuration that cannot work exits 2 (the unit does not restart).
    let o = brain(&["--config", "/nonexistent/brain.toml", "--check"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("/nonexistent/brain.toml"),
        "{}",
        stderr(&o)
    );

    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let certs = d.join("certs");
    let c = certs.to_str().unwrap();
    assert!(brain(&["certs", "init", "--dir", c]).status.success());
    assert!(brain(&["certs", "issue", "--dir", c, "--brain", "b1"])
        .status
        .success());
    assert!(brain(&["certs", "issue", "--dir", c, "--brain", "b2"])
        .status
        .success());
    let config = |id: &str, extra: &str| {
        let path = d.join(format!("{id}.toml"));
        std::fs::write(
            &path,
            format!(
                "brain_id = \"b1\"\ndata_dir = \"{data}\"\n{extra}\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/brain-{id}.pem\"\nkey = \"{c}/brain-{id}-key.pem\"\n[tokens]\nadmin = \"0123456789abcdef0123\"\n",
                data = d.join("data").display()
            ),
        )
        .unwrap();
        path
    };
    let good = config("b1", "");
    let o = brain(&["--config", good.to_str().unwrap(), "--check"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!d.join("data").exists(), "--check changes nothing");

    // Another brain's certificate.
    let wrong = config("b2", "");
    let o = brain(&["--config", wrong.to_str().unwrap(), "--check"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not for brain b1"), "{}", stderr(&o));

    // Unknown keys and bad values, all reported at once.
    let bad = config("b1", "cell_lost_grace = 3\n[quic]\nlisten = \"nowhere\"");
    let o = brain(&["--config", bad.to_str().unwrap(), "--check"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cell_lost_grace"), "{}", stderr(&o));
    // Started for real (as systemd does), the same: exit 2, nothing made.
    let o = brain(&["--config", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cell_lost_grace"), "{}", stderr(&o));
    assert!(!d.join("data").exists());
}
