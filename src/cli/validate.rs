//! `stochflow validate`: check a pipeline without running it.

use std::path::Path;
use std::process::ExitCode;

use crate::config;
use crate::runtime;

pub fn validate(pipeline_file: &Path) -> anyhow::Result<ExitCode> {
    let loaded = config::load(pipeline_file, None, None)?;
    if loaded.config.source.is_endless() {
        return validate_daemon(pipeline_file, &loaded);
    }
    let pipeline = runtime::plan(&loaded)?;
    let stages: Vec<&str> = pipeline.stages.iter().map(|s| s.name()).collect();
    let columns: Vec<String> =
        pipeline.output_schema.fields().iter().map(|f| format!("{} ({})", f.name(), describe(f))).collect();
    super::out!("{} is valid", pipeline_file.display());
    super::out!("  source: {} (key column {:?})", loaded.config.source.kind(), pipeline.key_column);
    super::out!("  stages: {}", if stages.is_empty() { String::from("none") } else { stages.join(" -> ") });
    super::out!("  output columns: {}", columns.join(", "));
    Ok(ExitCode::SUCCESS)
}

/// Checks a daemon pipeline as far as it can be checked without input: the
/// file, the daemon's settings and the models. Its stages are planned
/// against the columns of the first input the daemon receives.
fn validate_daemon(pipeline_file: &Path, loaded: &config::LoadedConfig) -> anyhow::Result<ExitCode> {
    let problems = crate::daemon::check(loaded);
    if !problems.is_empty() {
        return Err(loaded.error(problems).into());
    }
    let problems = crate::daemon::check_models(loaded);
    if !problems.is_empty() {
        return Err(loaded.error(problems).into());
    }
    let stages: Vec<&str> = loaded.config.stages.iter().map(|s| s.name()).collect();
    super::out!("{} is valid for `stochflow daemon`", pipeline_file.display());
    super::out!("  source: {}", loaded.config.source.kind());
    super::out!("  stages: {}", if stages.is_empty() { String::from("none") } else { stages.join(" -> ") });
    super::out!("  the stages are checked against the columns of the first input the daemon receives");
    Ok(ExitCode::SUCCESS)
}

fn describe(field: &arrow::datatypes::Field) -> String {
    match crate::tensor::TensorType::of_field(field) {
        Some(tensor) => format!("tensor {}", tensor.describe()),
        None => field.data_type().to_string(),
    }
}
