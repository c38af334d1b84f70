//! Instance lifecycle against a real agent, real containers and real cgroups.
//! Run as root through `cargo xtask test` (one test at a time).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{lrp, spec, task, Cell};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

fn alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn lrp_starts_runs_stops_and_leaves_nothing() {
    let cell = Cell::start();
    let v = cell.put_ok("web-0", &lrp("echo started; exec sleep 1000"));
    assert_eq!(v["state"], "running", "{v:#}");
    let pid = v["pid"].as_u64().unwrap();
    assert!(alive(pid));
    // The init process sits in the instance's cgroups, v1 and cgroup2.
    let procs = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/{}/web-0/cgroup.procs",
        cell.cgroup_root
    ))
    .unwrap();
    assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
    let procs2 = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/unified/{}/web-0/cgroup.procs",
        cell.cgroup_root
    ))
    .unwrap();
    assert!(procs2.lines().any(|l| l == pid.to_string()), "{procs2}");
    let limit = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/{}/web-0/memory.limit_in_bytes",
        cell.cgroup_root
    ))
    .unwrap();
    assert_eq!(limit.trim(), (32u64 << 20).to_string());

    // Same spec again: idempotent. A different spec: conflict.
    let again = cell.put("web-0", &lrp("echo started; exec sleep 1000"));
    assert_eq!(again.status, 200);
    assert_eq!(again.json().unwrap()["pid"].as_u64(), Some(pid));
    let other = cell.put("web-0", &lrp("exec sleep 5"));
    assert_eq!(other.status, 409, "{}", other.text());

    let list = cell.client.get("/v1/instances").unwrap().json().unwrap();
    assert_eq!(list["instances"].as_array().unwrap().len(), 1);

    let gone = cell.delete("web-0");
    assert_eq!(
        gone["state"], "exited",
        "a requested stop is not a crash: {gone:#}"
    );
    assert!(!alive(pid), "the process must be gone after DELETE");
    assert_eq!(cell.client.get("/v1/instances/web-0").unwrap().status, 404);
    cell.assert_clean();
}

#[test]
fn task_reports_exit_code_and_logs_both_streams() {
    let cell = Cell::start();
    cell.put_ok("job-1", &task("echo to-stdout; echo to-stderr >&2; exit 3"));
    let v = cell.wait_for("job-1", "ended", |v| {
        v["state"] == "exited" || v["state"] == "crashed"
    });
    assert_eq!(v["state"], "exited");
    assert_eq!(v["exit_code"], 3);
    assert_eq!(v["reason"], "exited with code 3");
    assert!(v["finished_at"].is_string());
    let logs = cell.logs("job-1");
    assert!(
        logs.lines().any(|l| l.ends_with(" stdout F to-stdout")),
        "{logs}"
    );
    assert!(
        logs.lines().any(|l| l.ends_with(" stderr F to-stderr")),
        "{logs}"
    );
    // An ended task holds no capacity but keeps its record until deleted.
    let state = cell.client.get("/v1/state").unwrap().json().unwrap();
    assert_eq!(state["capacity"]["available"]["containers"], 50);
    assert_eq!(
        cell.cgroup_dirs().len(),
        0,
        "an ended task keeps no cgroups"
    );
    cell.delete("job-1");
    cell.assert_clean();
}

#[test]
fn memory_limit_is_enforced_and_reported_as_oom_kill() {
    let cell = Cell::start();
    let mut s = task("x=0123456789abcdef; while true; do x=$x$x; done");
    s["resources"]["memory_mb"] = json!(16);
    cell.put_ok("hog", &s);
    let v = cell.wait_for("hog", "ended", |v| {
        v["state"] == "crashed" || v["state"] == "exited"
    });
    assert_eq!(v["state"], "crashed", "{v:#}");
    assert_eq!(v["oom_killed"], true, "{v:#}");
    assert!(
        v["reason"].as_str().unwrap().starts_with("out of memory"),
        "{v:#}"
    );
    let m = cell.metrics();
    assert!(m.lines().any(|l| l == "corral_oom_kills_total 1"), "{m}");
    assert!(
        m.lines()
            .any(|l| l == "corral_instance_ends_total{kind=\"task\",state=\"crashed\"} 1"),
        "{m}"
    );
    cell.delete("hog");
    cell.assert_clean();
}

#[test]
fn pids_limit_contains_a_fork_bomb() {
    let cell = Cell::start();
    // The forking subshell dies at the limit; the instance itself carries on.
    let mut s = lrp("(i=0; while [ $i -lt 200 ]; do sleep 1000 & i=$((i+1)); done); echo spawned; exec sleep 1000");
    s["resources"]["max_pids"] = json!(16);
    cell.put_ok("bomb", &s);
    let pids_file = format!("/sys/fs/cgroup/pids/{}/bomb/pids.current", cell.cgroup_root);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let logs = cell.logs("bomb");
        if logs.contains("spawned") {
            assert!(
                logs.contains("fork") || logs.contains("Resource temporarily unavailable"),
                "{logs}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fork loop never finished: {logs}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let current: u64 = std::fs::read_to_string(&pids_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(current <= 16, "pids.current {current} above the limit");
    assert_eq!(cell.get("bomb")["state"], "running");
    cell.delete("bomb");
    cell.assert_clean();
}

#[test]
fn disk_limit_is_enforced_by_a_filesystem_per_instance() {
    let cell = Cell::start();
    let state = cell.client.get("/v1/state").unwrap().json().unwrap();
    assert_eq!(state["disk_limits"], "filesystem-per-instance", "{state:#}");
    let mut s = task("dd if=/dev/zero of=/big bs=1M count=40 2>&1; stat -c size=%s /big");
    s["resources"]["disk_mb"] = json!(16);
    cell.put_ok("filler", &s);
    cell.wait_for("filler", "ended", |v| {
        v["state"] == "exited" || v["state"] == "crashed"
    });
    let logs = cell.logs("filler");
    assert!(logs.contains("No space left on device"), "{logs}");
    let size: u64 = logs
        .lines()
        .find_map(|l| l.split("size=").nth(1))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no size line in {logs}"));
    assert!(size <= 16 << 20, "wrote {size} bytes past a 16 MiB limit");
    // Another instance is not limited by the first one's quota.
    let mut s2 = task("dd if=/dev/zero of=/ok bs=1M count=20 2>&1 && echo wrote-ok");
    s2["resources"]["disk_mb"] = json!(32);
    cell.put_ok("roomy", &s2);
    cell.wait_state("roomy", "exited");
    assert!(cell.logs("roomy").contains("wrote-ok"));
    cell.delete("filler");
    cell.delete("roomy");
    cell.assert_clean();
}

#[test]
fn logs_are_followed_and_rotated() {
    let cell = Cell::start_with("[logs]\nmax_bytes = 4096\nkeep = 2\n");
    // Follow a task from its start to its end: the stream closes by itself.
    cell.put_ok(
        "chatty",
        &task("i=0; while [ $i -lt 30 ]; do echo line-$i; i=$((i+1)); sleep 0.05; done"),
    );
    let mut got = Vec::new();
    let status = cell
        .client
        .clone()
        .with_timeout(Some(Duration::from_secs(30)))
        .stream("GET", "/v1/instances/chatty/logs?follow=true", None, |c| {
            got.extend_from_slice(c);
            true
        })
        .unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(got).unwrap();
    for i in 0..30 {
        assert!(
            text.contains(&format!(" stdout F line-{i}\n")),
            "line-{i} missing from followed logs:\n{text}"
        );
    }
    cell.delete("chatty");

    // Rotation: ~40 KiB of output with 4 KiB files and 2 kept.
    cell.put_ok(
        "rot",
        &task("i=0; while [ $i -lt 600 ]; do echo rotation-test-line-$i; i=$((i+1)); done"),
    );
    cell.wait_state("rot", "exited");
    let dir = cell.data().join("instances/rot/logs");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["output.log", "output.log.1", "output.log.2"]);
    for f in &files {
        let len = std::fs::metadata(dir.join(f)).unwrap().len();
        assert!(len <= 4096, "{f} is {len} bytes");
    }
    let tail = cell
        .client
        .get("/v1/instances/rot/logs?tail=2")
        .unwrap()
        .text();
    let lines: Vec<_> = tail.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[1].ends_with("rotation-test-line-599"), "{tail}");
    cell.delete("rot");
    cell.assert_clean();
}

#[test]
fn agent_kill9_and_restart_readopts_instances_and_learns_exits() {
    let mut cell = Cell::start();
    let a = cell.put_ok("a", &lrp("exec sleep 1000"));
    let b = cell.put_ok("b", &lrp("while true; do echo tick; sleep 0.2; done"));
    cell.put_ok("t", &task("sleep 1; echo done; exit 7"));
    let (pa, pb) = (a["pid"].as_u64().unwrap(), b["pid"].as_u64().unwrap());

    cell.kill9_agent();
    assert!(
        alive(pa) && alive(pb),
        "killing the agent must not kill instances"
    );
    // The task ends while no agent is running.
    std::thread::sleep(Duration::from_millis(2000));
    assert!(alive(pa) && alive(pb));
    // What a kill leaves of a start cut before its spec was written: its
    // directories, empty.
    let cut = [
        cell.data().join("instances/cut"),
        cell.run_dir().join("instances/cut"),
    ];
    for d in &cut {
        std::fs::create_dir_all(d).unwrap();
    }

    cell.spawn_agent();
    for d in &cut {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    assert_eq!(cell.client.get("/v1/instances/cut").unwrap().status, 404);
    let a2 = cell.get("a");
    let b2 = cell.get("b");
    assert_eq!(
        (a2["state"].as_str(), a2["pid"].as_u64()),
        (Some("running"), Some(pa))
    );
    assert_eq!(
        (b2["state"].as_str(), b2["pid"].as_u64()),
        (Some("running"), Some(pb))
    );
    let t = cell.get("t");
    assert_eq!(t["state"], "exited", "{t:#}");
    assert_eq!(t["exit_code"], 7);
    assert!(cell.logs("t").contains("stdout F done"));
    // Logs kept flowing while the agent was away.
    let ticks = cell.logs("b").matches("tick").count();
    assert!(ticks >= 8, "only {ticks} ticks logged");
    // The re-adopted instances are still managed: stop works.
    let gone = cell.delete("a");
    assert_eq!(gone["state"], "exited");
    assert!(!alive(pa));
    cell.delete("b");
    cell.delete("t");
    cell.assert_clean();
}

#[test]
fn bad_input_is_refused_and_creates_nothing() {
    let cell = Cell::start();
    let c = &cell.client;
    let put_raw = |id: &str, body: &str| {
        c.request("PUT", &format!("/v1/instances/{id}"), Some(body.as_bytes()))
            .unwrap()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("bad-json", "{not json".into(), "invalid instance spec"),
        (
            "unknown",
            {
                let mut s = lrp("true");
                s["colour"] = json!("red");
                s.to_string()
            },
            "unknown field",
        ),
        (
            "no-rootfs",
            {
                let mut s = lrp("true");
                s["rootfs"] = json!("/nonexistent/rootfs");
                s.to_string()
            },
            "does not exist",
        ),
        (
            "no-cmd",
            spec("lrp", &["/bin/definitely-not-here"]).to_string(),
            "not an executable",
        ),
        (
            "absurd",
            {
                let mut s = lrp("true");
                s["resources"]["memory_mb"] = json!(1u64 << 40);
                s["resources"]["max_pids"] = json!(0);
                s.to_string()
            },
            "memory_mb",
        ),
        (
            "rel-rootfs",
            {
                let mut s = lrp("true");
                s["rootfs"] = json!("../../etc");
                s.to_string()
            },
            "absolute",
        ),
    ];
    for (id, body, want) in cases {
        let r = put_raw(id, &body);
        assert_eq!(r.status, 400, "{id}: {}", r.text());
        assert!(r.text().contains(want), "{id}: {}", r.text());
    }
    for bad_id in ["..", "a%2Fb", ".hidden", "x%00y"] {
        let r = put_raw(bad_id, &lrp("true").to_string());
        assert!(
            (400..500).contains(&r.status),
            "{bad_id}: {} {}",
            r.status,
            r.text()
        );
    }
    // Capacity: more memory than the cell offers.
    let mut big = lrp("true");
    big["resources"]["memory_mb"] = json!(4096);
    let r = cell.put("big", &big);
    assert_eq!(r.status, 409);
    assert!(r.text().contains("not enough memory"), "{}", r.text());
    assert_eq!(
        cell.client.get("/v1/instances").unwrap().json().unwrap()["instances"],
        json!([])
    );
    cell.assert_clean();
}

#[test]
fn a_command_that_cannot_exec_ends_crashed_with_a_reason() {
    let cell = Cell::start();
    // A rootfs whose command names an interpreter that does not exist.
    let root = cell.dir.path().join("brokenfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(
        common::rootfs().join("bin/busybox"),
        root.join("bin/busybox"),
    )
    .unwrap();
    std::fs::write(root.join("bin/broken"), "#!/no/such/interpreter\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        root.join("bin/broken"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let mut s = spec("lrp", &["/bin/broken"]);
    s["rootfs"] = json!(root);
    let started = Instant::now();
    let r = cell.put("broken", &s);
    assert!(r.is_success(), "{}", r.text());
    let v = cell.wait_for("broken", "crashed", |v| v["state"] == "crashed");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        !v["reason"].as_str().unwrap_or_default().is_empty(),
        "{v:#}"
    );
    cell.delete("broken");
    cell.assert_clean();
}

#[test]
fn instances_run_confined() {
    let cell = Cell::start();
    cell.put_ok(
        "probe",
        &task(concat!(
            "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; ",
            "mount -t tmpfs x /mnt && echo MOUNTED; ",
            "echo junk > /tmp/m.ko; insmod /tmp/m.ko && echo MODULE_LOADED; ",
            "unshare -U -n true && echo UNSHARED; ",
            "mknod /tmp/disk b 8 0 && echo MKNOD; ",
            "chroot / true && echo CHROOTED; ",
            "echo 'exit 0' > /proc/1/fd/3 && echo WROTE_INIT_PIPE; ",
            "echo procs=$(ls -d /proc/[0-9]* | wc -l); ",
            "echo pid1=$(tr '\\0' ' ' < /proc/1/cmdline); ",
            "echo probe-done"
        )),
    );
    cell.wait_for("probe", "ended", |v| {
        v["state"] == "exited" || v["state"] == "crashed"
    });
    let logs = cell.logs("probe");
    // AUDIT_WRITE, KILL, NET_BIND_SERVICE only.
    assert!(logs.contains("CapEff:\t0000000020000420"), "{logs}");
    assert!(logs.contains("CapBnd:\t0000000020000420"), "{logs}");
    assert!(logs.contains("NoNewPrivs:\t1"), "{logs}");
    assert!(logs.contains("Seccomp:\t2"), "{logs}");
    assert!(logs.contains("probe-done"), "{logs}");
    // (The markers are in the command line too, which the probe prints.)
    for escape in [
        "MOUNTED",
        "MODULE_LOADED",
        "UNSHARED",
        "MKNOD",
        "CHROOTED",
        "WROTE_INIT_PIPE",
    ] {
        let said = logs.lines().any(|l| l.ends_with(&format!(" F {escape}")));
        assert!(!said, "{escape}: {logs}");
    }
    // Its own pid namespace: PID 1 is corral-init running its shell, and
    // the host's processes are invisible (the init, the shell, ls, wc and a
    // few more at most).
    assert!(logs.contains("pid1=corral-init /bin/sh -c"), "{logs}");
    let procs: usize = logs
        .lines()
        .find_map(|l| l.split("procs=").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no process count: {logs}"));
    assert!(procs < 10, "{procs} processes visible: {logs}");
    // Writes go to the instance's own layer, never into the shared rootfs.
    cell.put_ok(
        "writer",
        &task("echo scribble > /etc/scribble && cat /etc/scribble"),
    );
    cell.wait_state("writer", "exited");
    assert!(cell.logs("writer").contains("scribble"));
    assert!(
        !common::rootfs().join("etc/scribble").exists(),
        "the shared rootfs was written to"
    );
    cell.delete("probe");
    cell.delete("writer");
    cell.assert_clean();
}

#[test]
fn metrics_expose_instances_and_capacity() {
    let cell = Cell::start();
    cell.put_ok("m-0", &lrp("exec sleep 1000"));
    let m = cell.metrics();
    for needle in [
        "corral_instance_cpu_seconds_total{instance=\"m-0\",tenant=\"acme\",app=\"app\"}",
        "corral_instance_memory_bytes{instance=\"m-0\",tenant=\"acme\",app=\"app\"}",
        "corral_instance_memory_limit_bytes{instance=\"m-0\",tenant=\"acme\",app=\"app\"} 33554432",
        "corral_instances{state=\"running\"} 1",
        "corral_cell_memory_capacity_bytes 2147483648",
        "corral_cell_memory_available_bytes 2113929216",
        "corral_cell_containers_available 49",
        "corral_instance_start_duration_seconds_count 1",
    ] {
        assert!(m.contains(needle), "missing {needle} in\n{m}");
    }
    cell.delete("m-0");
    cell.assert_clean();
}

#[test]
fn a_stop_gives_a_sigterm_handler_its_grace_and_ends_a_command_without_one_at_once() {
    let cell = Cell::start();
    // A handler: it gets SIGTERM and ends on its own, with its own status.
    cell.put_ok(
        "polite",
        &lrp("trap 'exit 7' TERM; echo armed; while true; do sleep 0.1; done"),
    );
    cell.wait_state("polite", "running");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cell.logs("polite").contains("armed") {
        assert!(Instant::now() < deadline, "the trap was never set");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = cell
        .client
        .delete("/v1/instances/polite?grace_secs=600")
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let gone: serde_json::Value = r.json().unwrap();
    // Its own exit status: the trap ran.
    assert_eq!(gone["exit_code"], 7, "{gone:#}");

    // No handler (`sleep`): corral-init, the container's first process,
    // passes the SIGTERM on and the default action ends the command at once
    // (were `sleep` the namespace's init itself, the kernel would drop it),
    // rather than after the 600 s grace (the client gives up after 90 s).
    cell.put_ok("deaf", &lrp("exec sleep 100000"));
    cell.wait_state("deaf", "running");
    let started = Instant::now();
    let r = cell
        .client
        .delete("/v1/instances/deaf?grace_secs=600")
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let gone: serde_json::Value = r.json().unwrap();
    assert_eq!(gone["signal"], 15, "{gone:#}");
    eprintln!(
        "a command without a SIGTERM handler stopped in {:?}",
        started.elapsed()
    );
    cell.assert_clean();
}

#[test]
fn orphans_are_reaped_and_signals_reach_the_command() {
    let cell = Cell::start();
    // A subshell starts `sleep 0.2` in the background and exits at once:
    // the sleep is orphaned, re-parented to the namespace's first process,
    // and ends. Were that `sleep 1000` itself (exec'd by the shell), it
    // would never wait for it: a zombie for the instance's whole life.
    cell.put_ok(
        "orphans",
        &lrp("for i in 1 2 3 4 5; do (sleep 0.2 &); done; exec sleep 1000"),
    );
    cell.wait_state("orphans", "running");
    let pid = cell.get("orphans")["pid"].as_u64().unwrap();
    let procs = format!(
        "/sys/fs/cgroup/memory/{}/orphans/cgroup.procs",
        cell.cgroup_root
    );
    let states = || -> Vec<(u64, String)> {
        std::fs::read_to_string(&procs)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .filter_map(|p| {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                let state = stat[stat.rfind(')')? + 1..].split_whitespace().next()?;
                Some((p, state.to_owned()))
            })
            .collect()
    };
    // The orphans end within 0.2 s; give them (and a loaded machine) 10 s
    // to end and be reaped, leaving corral-init and `sleep 1000`.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = states();
        if now.len() == 2 && now.iter().all(|(_, s)| s != "Z") {
            break;
        }
        assert!(Instant::now() < deadline, "not reaped: {now:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(states().iter().any(|(p, _)| *p == pid), "{:?}", states());
    // A signal to the instance's pid reaches the command: SIGUSR1 ends
    // `sleep` (its default action), and the instance records that signal.
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on the first process of a container this test started.
    unsafe {
        libc::kill(pid as i32, libc::SIGUSR1);
    }
    let v = cell.wait_for("orphans", "crashed", |v| v["state"] == "crashed");
    assert_eq!(v["signal"], libc::SIGUSR1, "{v:#}");
    assert!(v["exit_code"].is_null(), "{v:#}");
    cell.delete("orphans");
    cell.assert_clean();
}

#[test]
fn a_stop_right_after_the_start_is_never_lost() {
    // The shim hands over to its monitor just after reporting the start; a
    // SIGTERM in that window must be carried out, not kill the shim.
    let cell = Cell::start();
    for i in 0..20 {
        let id = format!("quick-{i}");
        cell.put_ok(&id, &lrp("exec sleep 1000"));
        let gone = cell.delete(&id);
        assert_eq!(gone["state"], "exited", "{gone:#}");
    }
    cell.assert_clean();
}
