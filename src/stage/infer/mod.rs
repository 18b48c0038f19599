//! The `infer` stage: runs an ONNX model through ONNX Runtime.
//!
//! Planning reads the model, opens its sessions and checks the pipeline
//! against the model's signature. Every model input must be fed by a column
//! or a constant, element types must match, and each column's per-row shape
//! must fit the input's dimensions after the leading batch dimension.
//!
//! Columns are handed to ONNX Runtime as views of the Arrow buffers, without
//! a copy. A record whose inputs hold NaN or infinity is rejected before the
//! run. When a run fails, the batch is retried record by record, so that only
//! the records that fail are rejected.
//!
//! With `mc_dropout`, the model's Dropout nodes stay active, and with
//! `inject_dropout`, dropout is added at named tensors. Either way the
//! stage draws the masks ([`dropout`]).

mod dropout;
mod pool;
mod weights;

use std::collections::{BTreeMap, HashMap};

use arrow::array::{Array, ArrayRef, Int64Array, UInt32Array};
use arrow::datatypes::{DataType, Field, Float32Type, Int64Type, SchemaRef};
use ort::session::{Session, SessionInputValue};
use ort::value::{Tensor, TensorElementType, TensorRef};

use super::{PlanContext, Planned, Stage, StageError, reject_rows, schema_with};
use crate::batch::{Batch, sample_indices};
use crate::config::{ConfigProblem, ConstantConfig, ConstantType, InferConfig};
use crate::model::dropout::SiteKind;
use crate::model::{ModelFile, Signature, TensorInfo};
use crate::rng::StageRng;
use crate::tensor::{self, ElementType, TensorType};
use pool::SessionPool;

/// A model input fed from a column.
struct ColumnInput {
    input: String,
    column: String,
    tensor: TensorType,
}

/// A model output kept as a column.
struct KeptOutput {
    output: String,
    column: String,
    element: OutputElement,
    /// Per-record shape: the output's dimensions after the batch dimension.
    shape: Vec<usize>,
}

#[derive(Clone, Copy, PartialEq)]
enum OutputElement {
    Float32,
    Int64,
}

pub struct Infer {
    name: String,
    model_sha256: String,
    /// The sessions of each copy of the model: one copy, or one per sample
    /// index with weight noise.
    members: Vec<SessionPool>,
    /// Worker threads that run batches at once.
    concurrency: usize,
    /// Records per model run.
    batch_size: usize,
    columns: Vec<ColumnInput>,
    constants: Vec<(String, ConstantConfig)>,
    outputs: Vec<KeptOutput>,
    key_column: String,
    schema: SchemaRef,
    dropout: Option<dropout::DropoutMasks>,
    /// The weight noise's settings, for the output's metadata.
    weight_noise: Option<String>,
    /// Whether the model fixes its batch dimension to 1. A batch can still
    /// hold several rows, when a record's samples stay together, and those
    /// run one at a time.
    batch_of_one: bool,
}

impl Infer {
    pub fn plan(config: &InferConfig, context: &PlanContext) -> Result<Planned, Vec<ConfigProblem>> {
        let name = config.name.clone().unwrap_or_else(|| String::from("infer"));
        let model = ModelFile::read(&config.model).map_err(|err| vec![context.problem("model", err.to_string())])?;
        let known: HashMap<String, f32> = config
            .constants
            .iter()
            .filter(|(_, constant)| constant.values.len() == 1)
            .map(|(input, constant)| (input.clone(), constant.values[0] as f32))
            .collect();
        if !config.mc_dropout
            && let Some(node) = crate::model::dropout::training_node(&model.bytes, &known)
        {
            return Err(vec![context.problem(
                "model",
                format!(
                    "Dropout node {node:?} runs in training mode (its training_mode input is true), so ONNX Runtime would drop elements with its own random generator and the output could not be reproduced; set `mc_dropout: true` to draw the masks from the pipeline's seed, or export the model in inference mode"
                ),
            )]);
        }
        let (session_count, threads) = config.parallelism();
        let first = model.session(threads).map_err(|err| vec![context.problem("model", err.to_string())])?;
        let signature = Signature::of(&first);

        let mut problems = Vec::new();
        let mut batch_size = config.batch_size;
        // Whether a column-fed input has its batch dimension fixed to 1.
        let mut batch_of_one = false;
        let mut columns = Vec::new();
        for input in &signature.inputs {
            let fed_by_column = config.inputs.get(&input.name);
            let fed_by_constant = config.constants.get(&input.name);
            match (fed_by_column, fed_by_constant) {
                (Some(_), Some(_)) => problems.push(context.problem(
                    &format!("constants.{}", input.name),
                    format!("model input {:?} is fed by both a column and a constant; keep one", input.name),
                )),
                (None, None) => problems.push(context.problem(
                    "inputs",
                    format!("model input {:?} ({} {}) is not fed; map it to a column under `inputs` or give it under `constants`", input.name, input.element_name(), input.shape_text()),
                )),
                (Some(column), None) => {
                    let key = format!("inputs.{}", input.name);
                    match check_column_input(input, column, &key, context) {
                        Ok((tensor, batch_limit)) => {
                            if let Some(limit) = batch_limit {
                                batch_size = batch_size.min(limit);
                                batch_of_one = true;
                            }
                            columns.push(ColumnInput { input: input.name.clone(), column: column.clone(), tensor });
                        }
                        Err(problem) => problems.push(problem),
                    }
                }
                (None, Some(constant)) => {
                    if let Err(problem) = check_constant(input, constant, &format!("constants.{}", input.name), context) {
                        problems.push(problem);
                    }
                }
            }
        }
        let input_names: Vec<&str> = signature.inputs.iter().map(|i| i.name.as_str()).collect();
        for (section, names) in
            [("inputs", config.inputs.keys().collect::<Vec<_>>()), ("constants", config.constants.keys().collect())]
        {
            for name in names {
                if !input_names.contains(&name.as_str()) {
                    problems.push(context.problem(
                        &format!("{section}.{name}"),
                        format!("the model has no input {name:?}; its inputs are {}", input_names.join(", ")),
                    ));
                }
            }
        }

        let output_names: Vec<&str> = signature.outputs.iter().map(|o| o.name.as_str()).collect();
        // Kept outputs become columns in the model's output order; names the
        // model lacks are appended so that they are reported below.
        let mut requested: Vec<(String, String)> = Vec::new();
        for output in &signature.outputs {
            match &config.outputs {
                Some(map) => {
                    if let Some(column) = map.get(&output.name) {
                        requested.push((output.name.clone(), column.clone()));
                    }
                }
                None => requested.push((output.name.clone(), output.name.clone())),
            }
        }
        for name in config.outputs.iter().flat_map(|map| map.keys()) {
            if !output_names.contains(&name.as_str()) {
                requested.push((name.clone(), name.clone()));
            }
        }
        let mut outputs = Vec::new();
        for (output, column) in requested {
            let key = format!("outputs.{output}");
            match signature.outputs.iter().find(|o| o.name == output) {
                None => problems.push(context.problem(
                    &key,
                    format!("the model has no output {output:?}; its outputs are {}", output_names.join(", ")),
                )),
                Some(info) => match check_output(info, column, &key, context) {
                    Ok(kept) => outputs.push(kept),
                    // Without `outputs`, every output is kept, and the file has no key to point at.
                    Err(problem) if config.outputs.is_none() => problems.push(context.problem(
                        "model",
                        format!("{}; list the outputs to keep under `outputs`, without {output:?}", problem.message),
                    )),
                    Err(problem) => problems.push(problem),
                },
            }
        }
        if let Some(noise) = &config.weight_noise {
            problems.extend(weights::model_problems(&model, noise, context));
        }
        if !config.inject_dropout.is_empty() {
            problems.extend(
                dropout::injection_problems(&model, &config.inject_dropout)
                    .into_iter()
                    .map(|error| context.problem(&error.setting, error.message)),
            );
        }
        if !problems.is_empty() {
            return Err(problems);
        }

        let constants: Vec<(String, ConstantConfig)> =
            config.constants.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let (model, first, masks) = if config.mc_dropout || !config.inject_dropout.is_empty() {
            drop(first);
            let plan = dropout::MaskPlan {
                threads,
                rng: StageRng::new(context.seed, &name),
                key_column: context.key_column,
                graph_inputs: columns.iter().map(|input| (input.input.clone(), input.tensor.shape.clone())).collect(),
                known,
                mc_dropout: config.mc_dropout,
                inject: config.inject_dropout.clone(),
                batch_of_one,
            };
            let probe = |rows: usize| zero_inputs(&columns, &constants, rows);
            let masked = dropout::mask_model(&model, plan, probe).map_err(|errors| {
                errors.into_iter().map(|error| context.problem(&error.setting, error.message)).collect::<Vec<_>>()
            })?;
            (masked.model, None, Some(masked.masks))
        } else {
            (model, Some(first), None)
        };
        let copies = match &config.weight_noise {
            Some(noise) => {
                let count = weights::member_count(context).map_err(|problem| vec![problem])?;
                Some(weights::ensemble(&model, noise, count, &name, context)?)
            }
            None => None,
        };
        let setting = match (&copies, &masks) {
            (Some(_), _) => "weight_noise",
            (None, Some(_)) if config.mc_dropout => "mc_dropout",
            (None, Some(_)) => "inject_dropout",
            (None, None) => "model",
        };
        let open = |model: &ModelFile, count: usize, first: Option<Session>| {
            let mut sessions: Vec<Session> = first.into_iter().collect();
            while sessions.len() < count {
                let session = model.session(threads).map_err(|err| {
                    let message = match setting {
                        "model" => err.to_string(),
                        _ => format!("the model rewritten for `{setting}` cannot be loaded: {err}"),
                    };
                    vec![context.problem(setting, message)]
                })?;
                sessions.push(session);
            }
            Ok::<_, Vec<ConfigProblem>>(SessionPool::new(sessions))
        };
        let (members, weight_noise, batch_size) = match copies {
            // Each copy has one session unless `sessions` sets more, because
            // each session contains a copy of the weights. A run holds the
            // batch's rows of one copy, so batches grow with the copies.
            Some(ensemble) => {
                let per_copy = config.sessions.unwrap_or(1);
                let mut members = Vec::with_capacity(ensemble.count as usize);
                for member in 0..ensemble.count {
                    let copy = ensemble
                        .member(&model, member)
                        .map_err(|message| vec![context.problem("weight_noise", message)])?;
                    members.push(open(&copy, per_copy, None)?);
                }
                tracing::info!(
                    stage = %name,
                    copies = members.len(),
                    sessions_per_copy = per_copy,
                    model_bytes = model.bytes.len(),
                    "opened the copies of the model with weight noise; each session holds its own weights"
                );
                let batch_size = if batch_of_one { 1 } else { batch_size * members.len() };
                (members, Some(ensemble.description), batch_size)
            }
            None => (vec![open(&model, session_count, first)?], None, batch_size),
        };

        let mut schema = context.input.clone();
        for output in &outputs {
            schema = schema_with(&schema, output_field(output));
        }
        let stage = Self {
            name,
            model_sha256: model.sha256.clone(),
            members,
            concurrency: session_count,
            batch_size,
            columns,
            constants,
            outputs,
            key_column: context.key_column.to_string(),
            schema: schema.clone(),
            dropout: masks,
            weight_noise,
            batch_of_one,
        };
        Ok((Box::new(stage), schema))
    }

    /// Runs the model on the rows of `data`, each row on the copy of the
    /// model for its sample index. Returns one column per kept output.
    fn run_rows(&self, data: &arrow::array::RecordBatch) -> Result<Vec<ArrayRef>, String> {
        let [only] = self.members.as_slice() else {
            return self.run_copies(data);
        };
        only.run(|session| self.run(session, data))
    }

    /// Runs each copy of the model on the rows of its sample index, and
    /// puts the outputs back in row order.
    fn run_copies(&self, data: &arrow::array::RecordBatch) -> Result<Vec<ArrayRef>, String> {
        let samples = sample_indices(data);
        let mut rows_of: Vec<Vec<u32>> = vec![Vec::new(); self.members.len()];
        let mut places = Vec::with_capacity(samples.len());
        for (row, &sample) in samples.iter().enumerate() {
            let rows = rows_of.get_mut(sample as usize).ok_or_else(|| {
                format!("sample index {sample} has no copy of the model; there are {} copies", self.members.len())
            })?;
            places.push((sample as usize, rows.len()));
            rows.push(row as u32);
        }
        // The outputs of the copies that ran; `slot` maps a copy to them.
        let mut outputs: Vec<Vec<ArrayRef>> = Vec::new();
        let mut slot = vec![0; self.members.len()];
        for (member, (pool, rows)) in self.members.iter().zip(&rows_of).enumerate() {
            if rows.is_empty() {
                continue;
            }
            let part = arrow::compute::take_record_batch(data, &UInt32Array::from(rows.clone()))
                .map_err(|err| err.to_string())?;
            slot[member] = outputs.len();
            outputs.push(pool.run(|session| self.run(session, &part))?);
        }
        let places: Vec<(usize, usize)> = places.into_iter().map(|(member, row)| (slot[member], row)).collect();
        (0..self.outputs.len())
            .map(|index| {
                let parts: Vec<&dyn Array> = outputs.iter().map(|columns| columns[index].as_ref()).collect();
                arrow::compute::interleave(&parts, &places).map_err(|err| err.to_string())
            })
            .collect()
    }

    /// Runs the model on `rows` records of `data`; returns one column per kept output.
    fn run(&self, session: &mut Session, data: &arrow::array::RecordBatch) -> Result<Vec<ArrayRef>, String> {
        let rows = data.num_rows();
        let mut inputs: Vec<(String, SessionInputValue<'_>)> = Vec::new();
        for input in &self.columns {
            let column = data.column_by_name(&input.column).expect("the planned column exists");
            let mut shape = vec![rows];
            shape.extend_from_slice(&input.tensor.shape);
            let value: SessionInputValue<'_> = match input.tensor.element {
                ElementType::Float32 => {
                    TensorRef::from_array_view((shape, tensor::f32_values(column).map_err(|e| e.to_string())?))
                        .map_err(|e| e.to_string())?
                        .into()
                }
                ElementType::UInt8 => {
                    TensorRef::from_array_view((shape, tensor::u8_values(column).map_err(|e| e.to_string())?))
                        .map_err(|e| e.to_string())?
                        .into()
                }
                ElementType::UInt16 => {
                    TensorRef::from_array_view((shape, tensor::u16_values(column).map_err(|e| e.to_string())?))
                        .map_err(|e| e.to_string())?
                        .into()
                }
            };
            inputs.push((input.input.clone(), value));
        }
        for (name, constant) in &self.constants {
            inputs.push((name.clone(), constant_value(constant)?));
        }
        if let Some(dropout) = &self.dropout {
            inputs.extend(dropout.draw(data)?);
        }

        let results = session.run(inputs).map_err(|e| e.to_string())?;
        let mut columns = Vec::with_capacity(self.outputs.len());
        for output in &self.outputs {
            let value = &results[output.output.as_str()];
            let per_row: usize = output.shape.iter().product();
            let column: ArrayRef = match output.element {
                OutputElement::Float32 => {
                    let (shape, values) = value.try_extract_tensor::<f32>().map_err(|e| e.to_string())?;
                    check_output_shape(&output.output, shape, rows, per_row, values.len())?;
                    let tensor_type = TensorType::new(ElementType::Float32, output.shape.clone());
                    if output.shape.is_empty() {
                        std::sync::Arc::new(arrow::array::PrimitiveArray::<Float32Type>::from(values.to_vec()))
                    } else {
                        tensor::build_f32(&tensor_type, values.to_vec()).map_err(|e| e.to_string())?
                    }
                }
                OutputElement::Int64 => {
                    let (shape, values) = value.try_extract_tensor::<i64>().map_err(|e| e.to_string())?;
                    check_output_shape(&output.output, shape, rows, per_row, values.len())?;
                    if output.shape.is_empty() {
                        std::sync::Arc::new(Int64Array::from(values.to_vec()))
                    } else {
                        let field = std::sync::Arc::new(Field::new("item", DataType::Int64, false));
                        let items = arrow::array::PrimitiveArray::<Int64Type>::from(values.to_vec());
                        std::sync::Arc::new(arrow::array::FixedSizeListArray::new(
                            field,
                            per_row as i32,
                            std::sync::Arc::new(items),
                            None,
                        ))
                    }
                }
            };
            columns.push(column);
        }
        Ok(columns)
    }

    /// Finds rows whose model inputs hold NaN or infinity.
    fn non_finite_rows(&self, data: &arrow::array::RecordBatch) -> Vec<Option<String>> {
        let mut problems = vec![None; data.num_rows()];
        for input in &self.columns {
            if input.tensor.element != ElementType::Float32 {
                continue;
            }
            let column = data.column_by_name(&input.column).expect("the planned column exists");
            let values = tensor::f32_values(column).expect("the planned column is float32");
            // A float is NaN or infinite when its exponent bits are all set.
            // Testing the whole column first without early exit lets the
            // compiler vectorize the common case, in which all are finite.
            const EXPONENT: u32 = 0x7f80_0000;
            if !values.iter().fold(false, |found, v| found | (v.to_bits() & EXPONENT == EXPONENT)) {
                continue;
            }
            let row_len = input.tensor.len().max(1);
            for (row, chunk) in values.chunks_exact(row_len).enumerate() {
                if problems[row].is_none()
                    && let Some(position) = chunk.iter().position(|v| !v.is_finite())
                {
                    problems[row] = Some(format!(
                        "column {:?} contains {} at index {} of the record's tensor of shape {:?}; the model input {:?} needs finite values",
                        input.column,
                        chunk[position],
                        crate::tensor::index_text(&input.tensor.shape, position),
                        input.tensor.shape,
                        input.input
                    ));
                }
            }
        }
        problems
    }

    fn attach(&self, data: &arrow::array::RecordBatch, outputs: Vec<ArrayRef>) -> arrow::array::RecordBatch {
        let mut result = data.clone();
        for (output, column) in self.outputs.iter().zip(outputs) {
            let schema = schema_with(&result.schema(), output_field(output));
            result = super::with_column(&result, &schema, &output.column, column);
        }
        arrow::array::RecordBatch::try_new(self.schema.clone(), result.columns().to_vec())
            .expect("the planned schema matches the outputs")
    }
}

/// Builds the tensor of a constant model input.
fn constant_value(constant: &ConstantConfig) -> Result<SessionInputValue<'static>, String> {
    let shape = constant.shape.clone().unwrap_or_else(|| vec![constant.values.len()]);
    let value: SessionInputValue<'static> = match constant.dtype {
        ConstantType::Float32 => {
            Tensor::from_array((shape, constant.values.iter().map(|&v| v as f32).collect::<Vec<_>>()))
                .map_err(|e| e.to_string())?
                .into()
        }
        ConstantType::Int64 => {
            Tensor::from_array((shape, constant.values.iter().map(|&v| v as i64).collect::<Vec<_>>()))
                .map_err(|e| e.to_string())?
                .into()
        }
        ConstantType::Bool => {
            Tensor::from_array((shape, constant.values.iter().map(|&v| v != 0.0).collect::<Vec<_>>()))
                .map_err(|e| e.to_string())?
                .into()
        }
    };
    Ok(value)
}

/// Builds the model inputs of `rows` records of zeros, and the constants.
fn zero_inputs(
    columns: &[ColumnInput],
    constants: &[(String, ConstantConfig)],
    rows: usize,
) -> Result<Vec<(String, SessionInputValue<'static>)>, String> {
    let mut inputs = Vec::new();
    for input in columns {
        let mut shape = vec![rows];
        shape.extend_from_slice(&input.tensor.shape);
        let len = shape.iter().product::<usize>();
        let value: SessionInputValue<'static> = match input.tensor.element {
            ElementType::Float32 => Tensor::from_array((shape, vec![0f32; len])).map_err(|e| e.to_string())?.into(),
            ElementType::UInt8 => Tensor::from_array((shape, vec![0u8; len])).map_err(|e| e.to_string())?.into(),
            ElementType::UInt16 => Tensor::from_array((shape, vec![0u16; len])).map_err(|e| e.to_string())?.into(),
        };
        inputs.push((input.input.clone(), value));
    }
    for (name, constant) in constants {
        inputs.push((name.clone(), constant_value(constant)?));
    }
    Ok(inputs)
}

fn check_output_shape(
    name: &str,
    shape: &ort::value::Shape,
    rows: usize,
    per_row: usize,
    len: usize,
) -> Result<(), String> {
    if len != rows * per_row || shape.first().copied() != Some(rows as i64) {
        return Err(format!("model output {name:?} has shape {shape:?}, expected {rows} rows of {per_row} values"));
    }
    Ok(())
}

fn output_field(output: &KeptOutput) -> Field {
    match output.element {
        OutputElement::Float32 if output.shape.is_empty() => Field::new(&output.column, DataType::Float32, false),
        OutputElement::Float32 => TensorType::new(ElementType::Float32, output.shape.clone()).field(&output.column),
        OutputElement::Int64 if output.shape.is_empty() => Field::new(&output.column, DataType::Int64, false),
        OutputElement::Int64 => {
            let item = std::sync::Arc::new(Field::new("item", DataType::Int64, false));
            Field::new(
                &output.column,
                DataType::FixedSizeList(item, output.shape.iter().product::<usize>() as i32),
                false,
            )
        }
    }
}

/// Checks a column against a model input. Returns the column's tensor type
/// and, when the model fixes its batch dimension to 1, that limit.
fn check_column_input(
    input: &TensorInfo,
    column: &str,
    key: &str,
    context: &PlanContext,
) -> Result<(TensorType, Option<usize>), ConfigProblem> {
    let tensor = context.tensor_column(key, column)?;
    let expected = match input.element {
        Some(TensorElementType::Float32) => ElementType::Float32,
        Some(TensorElementType::Uint8) => ElementType::UInt8,
        Some(TensorElementType::Uint16) => ElementType::UInt16,
        _ => {
            return Err(context.problem(
                key,
                format!(
                    "model input {:?} takes {}; stochflow feeds float32, uint8 and uint16 tensors only",
                    input.name,
                    input.element_name()
                ),
            ));
        }
    };
    if tensor.element != expected {
        return Err(context.problem(
            key,
            format!(
                "column {column:?} holds {} but model input {:?} takes {}; write the data as {}, or use a model whose input takes {}",
                tensor.element.name(),
                input.name,
                expected.name(),
                expected.name(),
                tensor.element.name()
            ),
        ));
    }
    let Some((batch_dim, per_record)) = input.dims.split_first() else {
        return Err(
            context.problem(key, format!("model input {:?} is a scalar; feed it under `constants`", input.name))
        );
    };
    let fits = per_record.len() == tensor.shape.len()
        && per_record.iter().zip(&tensor.shape).all(|(dim, size)| dim.is_none_or(|d| d == *size));
    if !fits {
        return Err(context.problem(
            key,
            format!(
                "column {column:?} has per-record shape {:?} but model input {:?} has shape {} (the first dimension is the batch); reshape the data or fix the preprocessing",
                tensor.shape,
                input.name,
                input.shape_text()
            ),
        ));
    }
    match batch_dim {
        None => Ok((tensor, None)),
        Some(1) => Ok((tensor, Some(1))),
        Some(n) => Err(context.problem(
            key,
            format!("model input {:?} has a fixed batch dimension of {n}; stochflow needs it dynamic or 1", input.name),
        )),
    }
}

fn check_constant(
    input: &TensorInfo,
    constant: &ConstantConfig,
    key: &str,
    context: &PlanContext,
) -> Result<(), ConfigProblem> {
    let expected = match constant.dtype {
        ConstantType::Float32 => TensorElementType::Float32,
        ConstantType::Int64 => TensorElementType::Int64,
        ConstantType::Bool => TensorElementType::Bool,
    };
    if input.element != Some(expected) {
        return Err(context.problem(
            key,
            format!(
                "model input {:?} takes {}, the constant is {}; set `dtype`",
                input.name,
                input.element_name(),
                crate::model::session::element_name(expected)
            ),
        ));
    }
    let shape = constant.shape.clone().unwrap_or_else(|| vec![constant.values.len()]);
    let fits = shape.len() == input.dims.len()
        && input.dims.iter().zip(&shape).all(|(dim, size)| dim.is_none_or(|d| d == *size));
    if !fits {
        return Err(context.problem(
            key,
            format!(
                "constant shape {shape:?} does not fit model input {:?} of shape {}",
                input.name,
                input.shape_text()
            ),
        ));
    }
    Ok(())
}

fn check_output(
    info: &TensorInfo,
    column: String,
    key: &str,
    context: &PlanContext,
) -> Result<KeptOutput, ConfigProblem> {
    let element = match info.element {
        Some(TensorElementType::Float32) => OutputElement::Float32,
        Some(TensorElementType::Int64) => OutputElement::Int64,
        _ => {
            return Err(context.problem(
                key,
                format!(
                    "model output {:?} is {}; stochflow keeps float32 and int64 outputs",
                    info.name,
                    info.element_name()
                ),
            ));
        }
    };
    let Some((first, per_record)) = info.dims.split_first() else {
        return Err(context.problem(key, format!("model output {:?} is a scalar, not one value per record", info.name)));
    };
    if let Some(size) = first.filter(|&size| size > 1) {
        return Err(context.problem(
            key,
            format!(
                "model output {:?} has shape {}, whose first dimension is fixed at {size}, so it is not the batch; stochflow keeps outputs with one row per record",
                info.name,
                info.shape_text()
            ),
        ));
    }
    let shape: Option<Vec<usize>> = per_record.iter().copied().collect();
    let Some(shape) = shape else {
        return Err(context.problem(key, format!("model output {:?} has shape {} with a dynamic dimension after the batch; stochflow needs a fixed per-record shape", info.name, info.shape_text())));
    };
    Ok(KeptOutput { output: info.name.clone(), column, element, shape })
}

impl Stage for Infer {
    fn name(&self) -> &str {
        &self.name
    }

    fn batch_size(&self) -> Option<usize> {
        Some(self.batch_size)
    }

    fn concurrency(&self) -> usize {
        self.concurrency
    }

    fn keeps_rows(&self) -> bool {
        true
    }

    fn process(&self, batch: Batch) -> Result<Batch, StageError> {
        let problems = self.non_finite_rows(&batch.data);
        let mut batch = reject_rows(batch, problems, &self.name, &self.key_column);
        if batch.data.num_rows() == 0 {
            batch.data = arrow::array::RecordBatch::new_empty(self.schema.clone());
            return Ok(batch);
        }

        if self.batch_of_one && batch.data.num_rows() > 1 {
            return self.process_one_by_one(batch);
        }
        let whole = self.run_rows(&batch.data);
        match whole {
            Ok(outputs) => {
                batch.data = self.attach(&batch.data, outputs);
                Ok(batch)
            }
            Err(message) => {
                tracing::warn!(stage = %self.name, error = %message, rows = batch.data.num_rows(), "model run failed; retrying record by record");
                self.process_one_by_one(batch)
            }
        }
    }

    fn provenance(&self) -> BTreeMap<String, String> {
        let mut provenance =
            BTreeMap::from([(format!("stochflow.model.{}.sha256", self.name), self.model_sha256.clone())]);
        if let Some(dropout) = &self.dropout {
            for (kind, setting) in [(SiteKind::Node, "mc_dropout"), (SiteKind::Injected, "inject_dropout")] {
                if let Some(masks) = dropout.describe(kind) {
                    provenance.insert(format!("stochflow.model.{}.{setting}", self.name), masks);
                }
            }
        }
        if let Some(noise) = &self.weight_noise {
            provenance.insert(format!("stochflow.model.{}.weight_noise", self.name), noise.clone());
        }
        provenance
    }
}

impl Infer {
    /// Runs each record alone and rejects those that fail.
    fn process_one_by_one(&self, mut batch: Batch) -> Result<Batch, StageError> {
        let rows = batch.data.num_rows();
        let mut parts = Vec::with_capacity(rows);
        let mut problems = Vec::with_capacity(rows);
        for row in 0..rows {
            let single = batch.data.slice(row, 1);
            match self.run_rows(&single) {
                Ok(outputs) => {
                    parts.push(self.attach(&single, outputs));
                    problems.push(None);
                }
                Err(message) => {
                    parts.push(arrow::array::RecordBatch::new_empty(self.schema.clone()));
                    problems.push(Some(format!("model run failed: {message}")));
                }
            }
        }
        // Failed rows are rejected from the input batch; successful rows
        // are stitched back together in order.
        let failed: Vec<Option<String>> = problems.clone();
        let rejected_only =
            reject_rows(Batch::new(batch.data.clone(), Vec::new()), failed, &self.name, &self.key_column);
        batch.rejected.extend(rejected_only.rejected);
        batch.data = arrow::compute::concat_batches(&self.schema, &parts)
            .map_err(|err| StageError { stage: self.name.clone(), message: err.to_string() })?;
        Ok(batch)
    }
}
