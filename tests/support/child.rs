//! Real child processes for the cross-process tests: the test binary
//! re-executes itself running only its `child` test, with the role and the
//! state directory in the environment. A child reports on stdout with
//! lines `OUT <value>`.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The child's role (which test body it runs).
pub const ROLE: &str = "BULWARK_CHILD";
/// The directory holding the shared state file.
pub const DIR: &str = "BULWARK_CHILD_DIR";

/// Starts this test binary again as a child playing `role` on `dir`.
pub fn spawn_child(role: &str, dir: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits for the child to succeed and returns its `OUT` values.
pub fn outputs(child: Child) -> Vec<String> {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "child failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once("OUT ").map(|(_, v)| v.to_owned()))
        .collect()
}

/// Blocks until the child prints `OUT ready`.
pub fn wait_ready(child: &mut Child) {
    let stdout = child.stdout.as_mut().unwrap();
    for line in BufReader::new(stdout).lines() {
        if line.unwrap().ends_with("OUT ready") {
            return;
        }
    }
    panic!("child exited before it was ready");
}
