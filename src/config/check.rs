//! Checks of a pipeline file that need neither the model nor the data.
//! Every problem is collected, so one run of `validate` lists them all.

use std::collections::HashSet;

use super::load::ConfigProblem;
use super::{Compression, PipelineConfig, RuntimeConfig, SinkConfig, SourceConfig, StageConfig};

pub fn check(config: &PipelineConfig) -> Vec<ConfigProblem> {
    let stages: Vec<Option<&StageConfig>> = config.stages.iter().map(Some).collect();
    check_sections(Sections {
        source: Some(&config.source),
        stages: &stages,
        sink: Some(&config.sink),
        runtime: Some(&config.runtime),
    })
}

/// The sections of a pipeline file that were read without problems. The
/// others are `None`, and stages keep their indices.
pub struct Sections<'a> {
    pub source: Option<&'a SourceConfig>,
    pub stages: &'a [Option<&'a StageConfig>],
    pub sink: Option<&'a SinkConfig>,
    pub runtime: Option<&'a RuntimeConfig>,
}

/// Checks the sections that are present, so that problems of one section
/// are listed together with type errors in another.
pub fn check_sections(sections: Sections<'_>) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    if let Some(source) = sections.source {
        problems.extend(check_source(source));
        problems.extend(super::latent::check(source, sections.stages));
    }
    if let Some(runtime) = sections.runtime {
        problems.extend(check_runtime(runtime));
    }
    problems.extend(check_stages(sections.stages));
    if let Some(sink) = sections.sink {
        problems.extend(check_sink(sink));
    }
    problems.extend(super::nats::check(sections.source, sections.sink));
    problems
}

fn check_sink(sink: &SinkConfig) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    if let SinkConfig::ArrowFile(arrow) = sink
        && arrow.rows_per_batch == 0
    {
        problems.push(ConfigProblem::new("sink.rows_per_batch", "must be at least 1, found 0"));
    }
    let (compression, compression_level) = sink.compression();
    if let Some(level) = compression_level {
        let levels = zstd::compression_level_range();
        if compression != Compression::Zstd {
            problems.push(ConfigProblem::new(
                "sink.compression_level",
                format!(
                    "applies to `compression: zstd` only, and compression is `{}`; remove `compression_level` or use zstd",
                    compression.name()
                ),
            ));
        } else if !levels.contains(&level) {
            problems.push(ConfigProblem::new(
                "sink.compression_level",
                format!(
                    "must be a zstd level from {} to {}, found {level}; higher levels compress more and write slower",
                    levels.start(),
                    levels.end()
                ),
            ));
        }
    }
    problems.extend(super::image_sink::check(sink));
    problems
}

fn check_source(source: &SourceConfig) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    let mut push = |path: String, message: String| problems.push(ConfigProblem::new(path, message));
    if source.batch_size() == 0 {
        push("source.batch_size".into(), "must be at least 1, found 0".into());
    }
    if let SourceConfig::ArrowFile(source) = source {
        for (column, tensor) in &source.tensors {
            if tensor.shape.is_empty() || tensor.shape.contains(&0) {
                push(
                    format!("source.tensors.{column}.shape"),
                    format!("must be a non-empty list of positive sizes, found {:?}", tensor.shape),
                );
            }
        }
    }
    problems
}

fn check_runtime(runtime: &RuntimeConfig) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    if runtime.workers == 0 {
        problems.push(ConfigProblem::new("runtime.workers", "must be at least 1, found 0"));
    }
    if runtime.channel_capacity == 0 {
        problems.push(ConfigProblem::new("runtime.channel_capacity", "must be at least 1, found 0"));
    }
    problems
}

fn check_stages(stages: &[Option<&StageConfig>]) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    let mut push = |path: String, message: String| problems.push(ConfigProblem::new(path, message));
    let mut names = HashSet::new();
    for (index, stage) in stages.iter().enumerate() {
        let Some(stage) = stage else { continue };
        let at = |key: &str| format!("stages[{index}].{key}");
        if !names.insert(stage.name().to_string()) {
            push(
                at("name"),
                format!(
                    "stage name {:?} is used twice; give each stage a unique `name` (it also keys the stage's random streams)",
                    stage.name()
                ),
            );
        }
        match stage {
            StageConfig::Preprocess(c) => {
                let channels = c.color.channels();
                for (key, values) in [("mean", &c.mean), ("std", &c.std)] {
                    if let Some(values) = values
                        && values.len() != channels
                    {
                        push(
                            at(key),
                            format!("has {} values but color {} has {channels} channels", values.len(), c.color.name()),
                        );
                    }
                }
                if let Some(std) = &c.std
                    && std.iter().any(|s| *s <= 0.0 || !s.is_finite())
                {
                    push(at("std"), format!("every value must be positive, found {std:?}"));
                }
                if let Some(mean) = &c.mean
                    && mean.iter().any(|m| !m.is_finite())
                {
                    push(at("mean"), format!("every value must be a finite number, found {mean:?}"));
                }
                if c.mean.is_some() != c.std.is_some() {
                    push(at("mean"), "normalization needs both `mean` and `std`".into());
                }
                if c.dtype != super::TensorDtype::Float32 && c.mean.is_some() {
                    push(
                        at("dtype"),
                        "integer output cannot hold normalized values; use dtype float32 or drop mean and std".into(),
                    );
                }
                if let Some(resize) = &c.resize {
                    match (resize.width, resize.height, resize.shorter_side) {
                        (Some(w), Some(h), None) if w > 0 && h > 0 => {}
                        (None, None, Some(side)) if side > 0 => {}
                        (Some(_), Some(_), None) | (None, None, Some(_)) => {
                            push(at("resize"), String::from("sizes must be positive"));
                        }
                        (_, _, Some(_)) => {
                            push(
                                at("resize"),
                                String::from("give either `width` and `height`, or `shorter_side`, not both"),
                            );
                        }
                        _ => push(at("resize"), String::from("give both `width` and `height`, or `shorter_side`")),
                    }
                    if let (Some(w), Some(h), Some(crop)) = (resize.width, resize.height, &c.center_crop)
                        && (crop.width > w || crop.height > h)
                    {
                        push(
                            at("center_crop"),
                            format!("the {}x{} crop is larger than the {w}x{h} resized image", crop.width, crop.height),
                        );
                    }
                }
                if let Some(crop) = &c.center_crop
                    && (crop.width == 0 || crop.height == 0)
                {
                    push(at("center_crop"), "width and height must be positive".into());
                }
            }
            StageConfig::AddNoise(c) => {
                for problem in c.check(at) {
                    push(problem.path, problem.message);
                }
            }
            StageConfig::Infer(c) => {
                if c.batch_size == 0 {
                    push(at("batch_size"), "must be at least 1, found 0".into());
                }
                if c.sessions == Some(0) {
                    push(at("sessions"), "must be at least 1, found 0".into());
                }
                if c.inputs.is_empty() {
                    push(at("inputs"), "map at least one model input to a column".into());
                }
                if c.outputs.as_ref().is_some_and(|outputs| outputs.is_empty()) {
                    push(
                        at("outputs"),
                        "keep at least one model output, or leave `outputs` out to keep them all".into(),
                    );
                }
                for (tensor, ratio) in &c.inject_dropout {
                    if !(0.0..1.0).contains(ratio) {
                        push(
                            format!("stages[{index}].inject_dropout.{tensor}"),
                            format!(
                                "the ratio of the dropout at tensor {tensor:?} is {ratio}; a ratio must be in [0, 1)"
                            ),
                        );
                    }
                }
                if let Some(noise) = &c.weight_noise {
                    if !noise.std.is_finite() || noise.std < 0.0 {
                        push(
                            at("weight_noise.std"),
                            format!(
                                "`std` is {}; the standard deviation of weight noise must be a finite number ≥ 0",
                                noise.std
                            ),
                        );
                    }
                    match noise.initializers.as_deref() {
                        Some([]) => push(
                            at("weight_noise.initializers"),
                            "`initializers` lists no initializer; name the weights to perturb, or remove the key to perturb every float32 initializer with more than one value".into(),
                        ),
                        Some(names) => {
                            let mut seen = HashSet::new();
                            for (position, name) in names.iter().enumerate() {
                                if !seen.insert(name) {
                                    push(
                                        format!("stages[{index}].weight_noise.initializers[{position}]"),
                                        format!("initializer {name:?} is listed twice; list each once"),
                                    );
                                }
                            }
                        }
                        None => {}
                    }
                }
                for (input, constant) in &c.constants {
                    let shape = constant.shape.clone().unwrap_or_else(|| vec![constant.values.len()]);
                    let expected: usize = shape.iter().product();
                    if expected != constant.values.len() {
                        push(
                            format!("stages[{index}].constants.{input}"),
                            format!("shape {shape:?} needs {expected} values, found {}", constant.values.len()),
                        );
                    }
                }
            }
            StageConfig::Repeat(c) => {
                if c.samples == 0 {
                    push(at("samples"), "must be at least 1, found 0".into());
                }
            }
            StageConfig::Sample(c) => {
                super::sampling::check_sample(c, &at).into_iter().for_each(|p| push(p.path, p.message))
            }
            StageConfig::Aggregate(c) => {
                super::sampling::check_aggregate(c, &at).into_iter().for_each(|p| push(p.path, p.message))
            }
            StageConfig::Augment(c) => c.problems().into_iter().for_each(|(key, message)| push(at(&key), message)),
        }
    }
    problems
}
