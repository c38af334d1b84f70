//! `corral completions SHELL` prints a script that completes corral's own
//! commands, and an unknown shell is a usage error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn corral(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn completion_scripts_name_the_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let o = corral(&["completions", shell]);
        assert!(
            o.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let script = String::from_utf8(o.stdout).unwrap();
        for word in ["push", "instances", "drain", "brain"] {
            assert!(script.contains(word), "{shell} script lacks {word}");
        }
    }
    let bash = String::from_utf8(corral(&["completions", "bash"]).stdout).unwrap();
    assert!(
        bash.contains("complete -F") && bash.contains("corral"),
        "{bash}"
    );
}

#[test]
fn an_unknown_shell_is_a_usage_error() {
    let o = corral(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid value"));
}
