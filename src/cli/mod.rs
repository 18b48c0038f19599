//! The command-line interface: `run`, `daemon`, `validate` and `inspect`.
//!
//! Exit codes: 0 success; 1 an error stopped the command; 2 the run finished
//! but skipped records; 130 (SIGINT) or 143 (SIGTERM) the run was stopped by
//! a signal and committed what it had finished. The daemon exits with 0
//! after a stop signal once it has committed everything it read, and with
//! 130 or 143 on a second stop signal.

mod inspect;
mod logging;
mod progress;
mod run;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "stochflow", version, about = "Reproducible randomness around ONNX model inference")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log line format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a pipeline over its whole source and write its output file.
    Run {
        /// The pipeline file (YAML).
        pipeline: PathBuf,
        /// Seed for every random draw, in place of the file's `seed`.
        #[arg(long)]
        seed: Option<u64>,
        /// Output file, in place of the sink's `path` (relative to the working
        /// directory); `-` writes an Arrow IPC stream to standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Run a pipeline as a service until SIGTERM or SIGINT: over a watched
    /// directory or a socket, writing rotated files with a checkpoint, or as
    /// one of a pool of daemons that share a NATS JetStream stream.
    /// SIGHUP reloads the pipeline file.
    Daemon {
        /// The pipeline file (YAML).
        pipeline: PathBuf,
        /// Seed for every random draw, in place of the file's `seed`.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Check a pipeline file, its data and its models without running it.
    Validate {
        /// The pipeline file (YAML).
        pipeline: PathBuf,
    },
    /// Print an ONNX model's inputs, outputs, opsets, weights and Dropout nodes.
    Inspect {
        /// The model file (.onnx).
        model: PathBuf,
        /// Also list the initializers (the weights `weight_noise` can name)
        /// and the tensors that the graph's nodes compute (the places
        /// `inject_dropout` can name).
        #[arg(long)]
        tensors: bool,
    },
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    // Usage errors exit with 1 so that 2 keeps meaning "finished, records skipped".
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if err.use_stderr() => {
            let _ = err.print();
            return ExitCode::from(1);
        }
        Err(err) => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
    };
    logging::init(cli.log_format);
    let result = match cli.command {
        Command::Run { pipeline, seed, output } => run::run(&pipeline, seed, output.as_deref()),
        Command::Daemon { pipeline, seed } => crate::daemon::run(&pipeline, seed),
        Command::Validate { pipeline } => validate::validate(&pipeline),
        Command::Inspect { model, tensors } => inspect::inspect(&model, tensors),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            logging::error(&format!("{err:#}"));
            ExitCode::from(1)
        }
    }
}

/// Prints a line to standard output, ignoring a closed pipe (as in
/// `stochflow inspect m.onnx | head -1`), where `println!` would panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}
pub(crate) use out;

/// Ends the process at once with `code`, without running exit handlers:
/// ONNX Runtime's would tear down its environment while sessions still run
/// on other threads, and those would log errors that look like model faults.
pub fn exit_now(code: u8) -> ! {
    // SAFETY: `_exit` takes no pointers and never returns; skipping exit
    // handlers is its purpose here.
    unsafe { libc::_exit(i32::from(code)) }
}

/// Exit code of a run that finished but skipped records.
pub const EXIT_SKIPPED: u8 = 2;
/// Exit code of a run stopped by SIGINT (Ctrl-C).
pub const EXIT_INTERRUPTED: u8 = 130;
/// Exit code of a run stopped by SIGTERM.
pub const EXIT_TERMINATED: u8 = 143;
