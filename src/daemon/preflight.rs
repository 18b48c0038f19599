//! Checks of a daemon pipeline that need its models but no input: the
//! stages themselves are planned against the first input's columns.

use crate::config::{ConfigProblem, LoadedConfig, StageConfig};
use crate::model::{ModelFile, Signature};

/// Loads each model stage's model and checks the input, constant and output
/// names of its settings against the model's.
pub fn check_models(loaded: &LoadedConfig) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    for (index, stage) in loaded.config.stages.iter().enumerate() {
        let StageConfig::Infer(infer) = stage else { continue };
        let at = |key: &str| format!("stages[{index}].{key}");
        let session = match ModelFile::read(&infer.model).and_then(|model| model.session(1)) {
            Ok(session) => session,
            Err(err) => {
                problems.push(ConfigProblem::new(at("model"), err.to_string()));
                continue;
            }
        };
        let signature = Signature::of(&session);
        let inputs: Vec<&str> = signature.inputs.iter().map(|input| input.name.as_str()).collect();
        for (section, name) in infer
            .inputs
            .keys()
            .map(|name| ("inputs", name))
            .chain(infer.constants.keys().map(|name| ("constants", name)))
        {
            if !inputs.contains(&name.as_str()) {
                problems.push(ConfigProblem::new(
                    at(&format!("{section}.{name}")),
                    format!("the model has no input {name:?}; its inputs are {}", inputs.join(", ")),
                ));
            }
        }
        let outputs: Vec<&str> = signature.outputs.iter().map(|output| output.name.as_str()).collect();
        for name in infer.outputs.iter().flat_map(|map| map.keys()) {
            if !outputs.contains(&name.as_str()) {
                problems.push(ConfigProblem::new(
                    at(&format!("outputs.{name}")),
                    format!("the model has no output {name:?}; its outputs are {}", outputs.join(", ")),
                ));
            }
        }
    }
    problems
}
