//! Records the source tree's `git describe` at build time, so `kiln study` can write into study.json the commit
//! its binary was built from (not whatever the tree holds when the study ends).

fn main() {
    let describe = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=KILN_COMMIT={describe}");
    // A new commit, a staged change, or an edit to any source makes the description stale. Only paths that exist:
    // cargo reruns the script on every build for one that does not (a fresh `git init` has no packed-refs).
    let watched =
        [".git/HEAD", ".git/refs", ".git/packed-refs", ".git/index", "tools", "model/src", "engine/src", "shaders"];
    for path in watched.into_iter().filter(|p| std::path::Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
}
