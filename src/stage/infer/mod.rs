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
//! With `mc_dropout`, the model's Dropout nodes stay active, with masks drawn
//! by the stage ([`dropout`]).

mod dropout;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use arrow::array::{ArrayRef, Int64Array};
use arrow::datatypes::{DataType, Field, Float32Type, Int64Type, SchemaRef};
use ort::session::{Session, SessionInputValue};
use ort::value::{Tensor, TensorElementType, TensorRef};

use super::{PlanContext, Planned, Stage, StageError, reject_rows, schema_with};
use crate::batch::Batch;
use crate::config::{ConfigProblem, ConstantConfig, ConstantType, InferConfig};
use crate::model::{ModelFile, Signature, TensorInfo};
use crate::rng::StageRng;
use crate::tensor::{self, ElementType, TensorType};

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
    pool: SessionPool,
    batch_size: usize,
    columns: Vec<ColumnInput>,
    constants: Vec<(String, ConstantConfig)>,
    outputs: Vec<KeptOutput>,
    key_column: String,
    schema: SchemaRef,
    dropout: Option<dropout::DropoutMasks>,
    /// Whether the model fixes its batch dimension to 1. A batch can still
    /// hold several rows, when a record's samples stay together, and those
    /// run one at a time.
    batch_of_one: bool,
}

/// Sessions shared by the worker threads; each run takes one for itself.
/// The first threads to run each own a session and take it whenever it is
/// free. With as many sessions as threads, each thread keeps its own, so a
/// session's buffers stay in the caches of the core its thread runs on.
struct SessionPool<S = Session> {
    /// Identifies the pool in the threads' records of their sessions.
    id: u64,
    free: Mutex<Free<S>>,
    returned: Condvar,
    size: usize,
}

struct Free<S> {
    /// Free sessions, with their slot numbers.
    sessions: Vec<(usize, S)>,
    /// Slots given to threads as their own so far: slots `0..owned`.
    owned: usize,
}

/// Source of [`SessionPool::id`].
static NEXT_POOL: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The slot this thread owns in each pool it ran in; `None` when the
    /// pool had none left to give.
    static OWN_SLOT: RefCell<Vec<(u64, Option<usize>)>> = const { RefCell::new(Vec::new()) };
}

impl<S> SessionPool<S> {
    fn new(sessions: Vec<S>) -> Self {
        let size = sessions.len();
        Self {
            id: NEXT_POOL.fetch_add(1, Ordering::Relaxed),
            free: Mutex::new(Free { sessions: sessions.into_iter().enumerate().collect(), owned: 0 }),
            returned: Condvar::new(),
            size,
        }
    }

    fn run<T>(&self, work: impl FnOnce(&mut S) -> T) -> T {
        let known = OWN_SLOT.with(|own| own.borrow().iter().find(|(pool, _)| *pool == self.id).map(|&(_, slot)| slot));
        let (slot, mut session) = {
            let mut free = self.free.lock().expect("a session pool lock is never poisoned by its users");
            let own = known.unwrap_or_else(|| {
                let slot = (free.owned < self.size).then_some(free.owned);
                free.owned += usize::from(slot.is_some());
                OWN_SLOT.with(|own| own.borrow_mut().push((self.id, slot)));
                slot
            });
            loop {
                let position = free.sessions.iter().position(|&(slot, _)| Some(slot) == own);
                if let Some(position) = position.or_else(|| free.sessions.len().checked_sub(1)) {
                    break free.sessions.swap_remove(position);
                }
                free = self.returned.wait(free).expect("a session pool lock is never poisoned by its users");
            }
        };
        let result = work(&mut session);
        self.free.lock().expect("a session pool lock is never poisoned by its users").sessions.push((slot, session));
        self.returned.notify_one();
        result
    }
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
                    Err(problem) => problems.push(problem),
                },
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }

        let constants: Vec<(String, ConstantConfig)> =
            config.constants.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let (model, first, masks) = if config.mc_dropout {
            drop(first);
            let plan = dropout::MaskPlan {
                threads,
                rng: StageRng::new(context.seed, &name),
                key_column: context.key_column,
                graph_inputs: columns.iter().map(|input| (input.input.clone(), input.tensor.shape.clone())).collect(),
                known,
                batch_of_one,
            };
            let probe = |rows: usize| zero_inputs(&columns, &constants, rows);
            let masked = dropout::mask_model(&model, plan, probe)
                .map_err(|message| vec![context.problem("mc_dropout", message)])?;
            (masked.model, None, Some(masked.masks))
        } else {
            (model, Some(first), None)
        };
        let mut sessions: Vec<Session> = first.into_iter().collect();
        while sessions.len() < session_count {
            let session = model.session(threads).map_err(|err| match masks {
                Some(_) => vec![context.problem(
                    "mc_dropout",
                    format!("the model with its Dropout nodes rewritten into masks cannot be loaded: {err}"),
                )],
                None => vec![context.problem("model", err.to_string())],
            })?;
            sessions.push(session);
        }

        let mut schema = context.input.clone();
        for output in &outputs {
            schema = schema_with(&schema, output_field(output));
        }
        let stage = Self {
            name,
            model_sha256: model.sha256.clone(),
            pool: SessionPool::new(sessions),
            batch_size,
            columns,
            constants,
            outputs,
            key_column: context.key_column.to_string(),
            schema: schema.clone(),
            dropout: masks,
            batch_of_one,
        };
        Ok((Box::new(stage), schema))
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
    let Some((_, per_record)) = info.dims.split_first() else {
        return Err(context.problem(key, format!("model output {:?} is a scalar, not one value per record", info.name)));
    };
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
        self.pool.size
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
        let whole = self.pool.run(|session| self.run(session, &batch.data));
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
            provenance.insert(format!("stochflow.model.{}.mc_dropout", self.name), dropout.describe());
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
            match self.pool.run(|session| self.run(session, &single)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_threads_keep_their_sessions() {
        // Two threads take turns. Each session remembers the thread of its
        // last run and counts the runs of another thread after it.
        let pool = SessionPool::new(vec![(0u32, None), (0u32, None)]);
        let turns = std::sync::Barrier::new(2);
        std::thread::scope(|scope| {
            for index in 0..2 {
                let (pool, turns) = (&pool, &turns);
                scope.spawn(move || {
                    let me = std::thread::current().id();
                    for round in 0..100 {
                        turns.wait();
                        if round % 2 == index {
                            pool.run(|(switches, last): &mut (u32, Option<std::thread::ThreadId>)| {
                                *switches += u32::from(last.is_some_and(|last| last != me));
                                *last = Some(me);
                            });
                        }
                    }
                });
            }
        });
        let free = pool.free.into_inner().unwrap();
        assert_eq!(free.sessions.len(), 2);
        assert!(free.sessions.iter().all(|(_, (switches, _))| *switches == 0), "a thread took the other's session");
    }
}
