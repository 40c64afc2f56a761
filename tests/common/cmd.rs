//! Running the verlay binary as a command (`verlay image pull ...`) from a test: spawned with
//! its output captured, waited for a bounded time (killed by its handle past it), and the
//! test image those commands work on.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::rig::{e2e_script, verlay_bin};

/// How long one verlay command may take (a pull or push of the test image over a
/// throttled proxy included).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// What a command did.
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Asserts that it succeeded (`what` names it in the failure).
    pub fn ok(&self, what: &str) -> &Self {
        assert_eq!(self.code, Some(0), "{what} failed:\n{}", self.stderr);
        self
    }

    /// What a successful command printed (import and pull: the lowerdir), trimmed.
    pub fn printed(&self, what: &str) -> String {
        self.ok(what).stdout.trim().to_string()
    }
}

/// verlay with `args` and `env`, stdin null, stdout and stderr captured.
pub fn spawn_verlay(args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(verlay_bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run verlay")
}

/// Wait for `child` (`what`, for the failure) at most [`COMMAND_TIMEOUT`]; past it, kill it
/// by its handle and panic.
pub fn wait_out(mut child: Child, what: &str) -> Out {
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} took more than {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `verlay ARGS...`, waited for.
pub fn verlay(args: &[&str]) -> Out {
    wait_out(spawn_verlay(args, &[]), &format!("verlay {}", args.join(" ")))
}

/// The test image (tests/e2e/image.sh) in `dir/img`; returns its env (image.env).
pub fn test_image(dir: &Path) -> BTreeMap<String, String> {
    let img = dir.join("img");
    let out = Command::new("bash")
        .arg(e2e_script("image.sh"))
        .arg(&img)
        .output()
        .expect("image.sh");
    assert!(
        out.status.success(),
        "image.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::read_to_string(img.join("image.env"))
        .expect("image.env")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches(['"', '\'']).to_string()))
        .collect()
}
