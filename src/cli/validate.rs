//! `stochflow validate`: check a pipeline without running it.

use std::path::Path;
use std::process::ExitCode;

use crate::config;
use crate::runtime;

pub fn validate(pipeline_file: &Path) -> anyhow::Result<ExitCode> {
    let loaded = config::load(pipeline_file, None, None)?;
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

fn describe(field: &arrow::datatypes::Field) -> String {
    match crate::tensor::TensorType::of_field(field) {
        Some(tensor) => format!("tensor {}", tensor.describe()),
        None => field.data_type().to_string(),
    }
}
