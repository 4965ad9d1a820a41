//! Builds `tests/fixtures/fakecuda.c` (the fake CUDA driver) for the tests that load it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles the fixture into `CARGO_TARGET_TMPDIR` (once per content: concurrent test processes
/// share the result). `Ok(None)` when there is no C compiler.
pub fn build() -> Result<Option<PathBuf>, String> {
    use std::hash::{Hash, Hasher};
    // The fixture lives in the workspace root's tests/ (this file is also used from cli/tests).
    let src = Path::new(file!())
        .parent()
        .and_then(Path::parent)
        .map(|tests| tests.join("fixtures/fakecuda.c"))
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .ancestors()
                .map(|d| d.join("tests/fixtures/fakecuda.c"))
                .find(|p| p.exists())
                .unwrap_or_else(|| {
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fakecuda.c")
                })
        });
    let text = std::fs::read(&src).map_err(|e| format!("reading {}: {e}", src.display()))?;
    // `CC` may carry arguments (`ccache cc`, `cc -fsanitize=address`); they are part of the key.
    let cc = std::env::var("CC").unwrap_or_default();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    cc.hash(&mut h);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fakecuda");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let out = dir.join(format!("libfakecuda-{:016x}.so", h.finish()));
    if out.exists() {
        return Ok(Some(out));
    }
    let tmp = dir.join(format!(".libfakecuda-{}.so.tmp", std::process::id()));
    let mut words = cc.split_whitespace();
    let program = words.next().unwrap_or("cc");
    let output = match Command::new(program)
        .args(words)
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-o"])
        .arg(&tmp)
        .arg(&src)
        .arg("-lpthread")
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("running {program}: {e}")),
    };
    if !output.status.success() {
        return Err(format!(
            "{program} failed to build {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    if !output.stderr.is_empty() {
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    }
    std::fs::rename(&tmp, &out).map_err(|e| format!("renaming to {}: {e}", out.display()))?;
    Ok(Some(out))
}
