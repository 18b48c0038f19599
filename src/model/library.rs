//! Finds and loads the ONNX Runtime shared library.
//!
//! ONNX Runtime is loaded at run time, so a stochflow binary carries no copy
//! of it. The library is looked up, in this order:
//!
//! 1. the path in `ORT_DYLIB_PATH`;
//! 2. the stochflow cache, when an earlier download filled it;
//! 3. the `onnxruntime` Python package of `python3` (or `$STOCHFLOW_PYTHON`),
//!    when its version is [`ORT_VERSION`]'s minor release;
//! 4. the stochflow cache again, filled now by `pip download` of PyPI's
//!    `onnxruntime` wheel, which ships `onnxruntime/capi/libonnxruntime.so.*`.
//!
//! The cache comes before Python because asking Python takes a process
//! start (about 0.1 s) at every run.
//!
//! The cache is `$STOCHFLOW_CACHE_DIR`, else `$XDG_CACHE_HOME/stochflow`, else
//! `~/.cache/stochflow`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ort::environment::Environment;

/// The ONNX Runtime release stochflow is built and tested against.
pub const ORT_VERSION: &str = "1.31.1";
const ORT_MINOR: &str = "1.31.";

#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("ORT_DYLIB_PATH is set to {}, which does not exist; point it at libonnxruntime.so {ORT_VERSION} or unset it", .0.display())]
    EnvPathMissing(PathBuf),
    #[error(
        "cannot find the ONNX Runtime library (libonnxruntime.so {ORT_VERSION}); looked at ORT_DYLIB_PATH (not set), \
         the onnxruntime Python package ({python}), and the download cache {} ({fetch}). \
         Either set ORT_DYLIB_PATH to a libonnxruntime.so.{ORT_VERSION}, or run `{pip} install onnxruntime=={ORT_VERSION}`",
        cache.display()
    )]
    NotFound { python: String, cache: PathBuf, fetch: String, pip: String },
    #[error("cannot load the ONNX Runtime library {}: {message}; set ORT_DYLIB_PATH to a working libonnxruntime.so {ORT_VERSION}", path.display())]
    Load { path: PathBuf, message: String },
    #[error("the cached ONNX Runtime library {} is damaged ({message}); delete the folder {} to download it again", path.display(), path.parent().unwrap_or(path).display())]
    Damaged { path: PathBuf, message: String },
    /// A failure of an earlier attempt in this process, kept as its message.
    #[error("{0}")]
    Earlier(String),
}

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// Returns the process-wide ONNX Runtime environment, loading the library on
/// first use.
pub fn environment() -> Result<Environment, LibraryError> {
    let result = ENVIRONMENT.get_or_init(|| {
        let path = find().map_err(|err| err.to_string())?;
        tracing::debug!(library = %path.display(), "loading ONNX Runtime");
        let builder = ort::init_from(&path)
            .map_err(|err| LibraryError::Load { path: path.clone(), message: err.to_string() }.to_string())?;
        builder
            .with_name("stochflow")
            .build()
            .map_err(|err| LibraryError::Load { path, message: err.to_string() }.to_string())
    });
    result.clone().map_err(LibraryError::Earlier)
}

/// Looks for the library in the places the module documentation lists.
pub fn find() -> Result<PathBuf, LibraryError> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        let path = PathBuf::from(path);
        return if path.exists() { Ok(path) } else { Err(LibraryError::EnvPathMissing(path)) };
    }

    let cache = cache_dir().join(format!("onnxruntime-{ORT_VERSION}"));
    let cached = cache.join(format!("libonnxruntime.so.{ORT_VERSION}"));
    if cached.exists() {
        check_cache(&cache)?;
        return Ok(cached);
    }

    let python = python();
    let python_outcome = match from_python_package(&python) {
        Ok(path) => return Ok(path),
        Err(reason) => reason,
    };
    match download_into(&python, &cache) {
        Ok(()) if cached.exists() => Ok(cached),
        Ok(()) => Err(not_found(&python, python_outcome, &cache, "the wheel did not contain the library".into())),
        Err(reason) => Err(not_found(&python, python_outcome, &cache, reason)),
    }
}

/// Compares the cached files with the sizes the extraction recorded in
/// `MANIFEST`, so that a damaged library is reported instead of crashing
/// the process when it is mapped.
fn check_cache(cache: &Path) -> Result<(), LibraryError> {
    let Ok(manifest) = std::fs::read_to_string(cache.join("MANIFEST")) else {
        return Ok(());
    };
    for line in manifest.lines() {
        let Some((name, size)) = line.rsplit_once(' ') else { continue };
        let path = cache.join(name);
        let expected: u64 = size.parse().unwrap_or_default();
        let actual = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if actual != expected {
            return Err(LibraryError::Damaged { path, message: format!("{actual} bytes, expected {expected}") });
        }
    }
    Ok(())
}

fn not_found(python: &str, python_outcome: String, cache: &Path, fetch: String) -> LibraryError {
    LibraryError::NotFound {
        python: python_outcome,
        cache: cache.to_path_buf(),
        fetch: format!("download failed: {fetch}"),
        pip: format!("{python} -m pip"),
    }
}

fn python() -> String {
    std::env::var("STOCHFLOW_PYTHON").unwrap_or_else(|_| String::from("python3"))
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STOCHFLOW_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("stochflow");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("stochflow")
}

/// Asks Python where its `onnxruntime` package is. Returns the reason when
/// the package is missing or of another release.
fn from_python_package(python: &str) -> Result<PathBuf, String> {
    // Finds the package without importing it: importing onnxruntime loads
    // numpy and takes a large part of a short run's start-up.
    const PROBE: &str = "import importlib.metadata as m, importlib.util as u, os; \
        spec = u.find_spec('onnxruntime'); print(m.version('onnxruntime')); print(os.path.dirname(spec.origin))";
    let output =
        Command::new(python).args(["-c", PROBE]).output().map_err(|err| format!("{python} did not start: {err}"))?;
    if !output.status.success() {
        return Err(format!("{python} has no onnxruntime package"));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut lines = text.lines();
    let version = lines.next().unwrap_or_default().trim().to_string();
    let dir = PathBuf::from(lines.next().unwrap_or_default().trim());
    if !version.starts_with(ORT_MINOR) {
        return Err(format!("{python} has onnxruntime {version}, not {ORT_MINOR}x"));
    }
    let library = dir.join("capi").join(format!("libonnxruntime.so.{version}"));
    if library.exists() { Ok(library) } else { Err(format!("{} is missing", library.display())) }
}

/// Downloads the `onnxruntime` wheel with pip and extracts its shared
/// libraries into `target`. The files are extracted next to `target` first
/// and renamed into place, so a crash never leaves a partial library there.
fn download_into(python: &str, target: &Path) -> Result<(), String> {
    let parent = target.parent().ok_or("the cache directory has no parent")?;
    std::fs::create_dir_all(parent).map_err(|err| format!("cannot create {}: {err}", parent.display()))?;
    let staging = parent.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|err| format!("cannot create {}: {err}", staging.display()))?;

    tracing::info!(version = ORT_VERSION, cache = %target.display(), "downloading ONNX Runtime with pip (once)");
    let result = fetch_wheel(python, &staging).and_then(|()| extract_libraries(python, &staging));
    let outcome = result.and_then(|()| {
        std::fs::rename(staging.join("lib"), target)
            .map_err(|err| format!("cannot move the library into {}: {err}", target.display()))
    });
    let _ = std::fs::remove_dir_all(&staging);
    if outcome.is_err() && target.exists() {
        // Another process finished the same download first.
        return Ok(());
    }
    outcome
}

fn fetch_wheel(python: &str, staging: &Path) -> Result<(), String> {
    let output = Command::new(python)
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest"])
        .arg(staging)
        .arg(format!("onnxruntime=={ORT_VERSION}"))
        .output()
        .map_err(|err| format!("{python} did not start: {err}"))?;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!("pip download failed: {}", stderr.trim().lines().last().unwrap_or("no message")))
    }
}

fn extract_libraries(python: &str, staging: &Path) -> Result<(), String> {
    // The wheel is a zip file; Python's zipfile avoids another Rust dependency
    // on a path that runs once per machine.
    const EXTRACT: &str = "import glob, os, sys, zipfile\n\
        staging = sys.argv[1]\n\
        wheel = glob.glob(os.path.join(staging, 'onnxruntime-*.whl'))[0]\n\
        out = os.path.join(staging, 'lib')\n\
        os.makedirs(out)\n\
        sizes = []\n\
        with zipfile.ZipFile(wheel) as z:\n\
        \x20   for name in z.namelist():\n\
        \x20       if name.startswith('onnxruntime/capi/lib') and '.so' in name:\n\
        \x20           data = z.read(name)\n\
        \x20           with open(os.path.join(out, os.path.basename(name)), 'wb') as f:\n\
        \x20               f.write(data)\n\
        \x20           sizes.append(f'{os.path.basename(name)} {len(data)}')\n\
        with open(os.path.join(out, 'MANIFEST'), 'w') as f:\n\
        \x20   f.write('\\n'.join(sizes) + '\\n')\n";
    let output = Command::new(python)
        .args(["-c", EXTRACT])
        .arg(staging)
        .output()
        .map_err(|err| format!("{python} did not start: {err}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("cannot extract the wheel: {}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}
