//! Conversion of Arrow record batches into source batches, shared by the
//! `arrow_file` and `socket` sources: column projection, the key column and
//! tensor columns.
//!
//! Columns pass through unchanged, except those listed under `tensors`,
//! which become float32 tensor columns of the configured shape. Lists of any
//! numeric type are accepted there. A null row or a row of the wrong length
//! is rejected with its key, and the run goes on.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, FixedSizeListArray, Int64Array, RecordBatch, StringArray};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef};

use super::{ORDINAL_COLUMN, SourceError, WATCH_KEY_COLUMN};
use crate::batch::{Batch, Keys, ORIGIN_COLUMN, Rejected};
use crate::config::TensorShapeConfig;
use crate::tensor::{self, ElementType, TensorType};

/// The column settings of a source that reads Arrow data.
pub struct ColumnSettings<'a> {
    /// Column that contains the record key; a key is generated when absent.
    pub id_column: Option<&'a str>,
    /// Columns to read, in this order; all columns when absent.
    pub columns: Option<&'a [String]>,
    /// List columns to read as float32 tensors of these per-row shapes.
    pub tensors: &'a BTreeMap<String, TensorShapeConfig>,
}

/// The key column added when there is no id column.
pub enum GeneratedKey {
    /// An Int64 `ordinal` column: the row's position in the input, from 0.
    Ordinal,
    /// A Utf8 `key` column of `STREAM:POSITION`: the stream name and the
    /// row's position in the stream.
    StreamPosition(Arc<str>),
}

/// Converts the record batches of one input into source batches.
pub struct Converter {
    /// Indices of the input's columns that are read, in output order.
    projection: Vec<usize>,
    tensors: BTreeMap<String, TensorType>,
    key_column: String,
    /// The key column to add, if there is no id column.
    generated: Option<GeneratedKey>,
    schema: SchemaRef,
    /// Position in the input of the next row, for generated keys.
    next_position: u64,
    /// The input's name, written to an origin column when set.
    origin: Option<Arc<str>>,
}

impl Converter {
    /// Checks the settings against the input's schema and plans the output
    /// schema. `input_name` names the input in error messages, and
    /// `first_position` is the position of the first row converted.
    pub fn new(
        input_schema: &Schema,
        input_name: &str,
        settings: &ColumnSettings<'_>,
        generated: GeneratedKey,
        first_position: u64,
    ) -> Result<Self, SourceError> {
        let unknown = |key: String, name: &str| SourceError::Config {
            path: key,
            message: format!(
                "column {name:?} is not in {input_name}; its columns are {}",
                input_schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
            ),
        };

        let names: Vec<String> = match settings.columns {
            Some(columns) => columns.to_vec(),
            None => input_schema.fields().iter().map(|f| f.name().clone()).collect(),
        };
        let mut projection = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let index = input_schema.index_of(name).map_err(|_| unknown(format!("source.columns[{i}]"), name))?;
            projection.push(index);
        }
        if let Some(id) = settings.id_column {
            let index = input_schema.index_of(id).map_err(|_| unknown(String::from("source.id_column"), id))?;
            let data_type = input_schema.field(index).data_type();
            if !matches!(
                data_type,
                DataType::Int64 | DataType::Int32 | DataType::UInt64 | DataType::Utf8 | DataType::LargeUtf8
            ) {
                return Err(SourceError::Config {
                    path: String::from("source.id_column"),
                    message: format!("id column {id:?} has type {data_type}; use an integer or string column"),
                });
            }
            if !projection.contains(&index) {
                projection.insert(0, index);
            }
        }

        let mut tensors = BTreeMap::new();
        for (name, shape) in settings.tensors {
            let key = format!("source.tensors.{name}");
            let index = input_schema.index_of(name).map_err(|_| unknown(key.clone(), name))?;
            let item = match input_schema.field(index).data_type() {
                DataType::List(item) | DataType::LargeList(item) | DataType::FixedSizeList(item, _) => {
                    item.data_type().clone()
                }
                other => {
                    return Err(SourceError::Config {
                        path: key,
                        message: format!("column {name:?} has type {other}; a tensor column must be a list of numbers"),
                    });
                }
            };
            if !item.is_numeric() {
                return Err(SourceError::Config {
                    path: key,
                    message: format!(
                        "column {name:?} contains {item} values, but a tensor column must contain numbers"
                    ),
                });
            }
            tensors.insert(name.clone(), TensorType::new(ElementType::Float32, shape.shape.clone()));
            if !projection.contains(&index) {
                return Err(SourceError::Config {
                    path: key,
                    message: format!(
                        "column {name:?} is listed under `tensors` but not under `columns`; add it to `columns`"
                    ),
                });
            }
        }

        // Fixed-size numeric list columns are tensors even when not listed, so
        // that their null rows are rejected here rather than read as zeros.
        for &index in &projection {
            let field = input_schema.field(index);
            if tensors.contains_key(field.name()) {
                continue;
            }
            if let DataType::FixedSizeList(item, size) = field.data_type()
                && item.data_type().is_numeric()
            {
                let element = ElementType::from_arrow(item.data_type()).unwrap_or(ElementType::Float32);
                let shape = crate::tensor::declared_shape(field).unwrap_or_else(|| vec![*size as usize]);
                tensors.insert(field.name().clone(), TensorType::new(element, shape));
            }
        }

        let mut fields = Vec::new();
        let (key_column, generated) = match settings.id_column {
            Some(id) => (id.to_string(), None),
            None => {
                let column = match &generated {
                    GeneratedKey::Ordinal => Field::new(ORDINAL_COLUMN, DataType::Int64, false),
                    GeneratedKey::StreamPosition(_) => Field::new(WATCH_KEY_COLUMN, DataType::Utf8, false),
                };
                fields.push(column.clone());
                (column.name().clone(), Some(generated))
            }
        };
        for &index in &projection {
            let field = input_schema.field(index);
            match tensors.get(field.name()) {
                Some(tensor) => fields.push(tensor.field(field.name())),
                None => fields.push(field.clone()),
            }
        }
        Ok(Self {
            projection,
            tensors,
            key_column,
            generated,
            schema: Arc::new(Schema::new(fields)),
            next_position: first_position,
            origin: None,
        })
    }

    /// Adds a string column `origin` holding `origin` on every row, and
    /// names it as the origin of rejected records. An input that has its own
    /// `origin` column is rejected.
    pub fn with_origin(mut self, origin: Arc<str>) -> Result<Self, SourceError> {
        if self.schema.field_with_name(ORIGIN_COLUMN).is_ok() {
            return Err(SourceError::Config {
                path: String::from("source.columns"),
                message: format!(
                    "the input has a column named {ORIGIN_COLUMN:?}, which the daemon adds itself; leave it out with `columns`"
                ),
            });
        }
        let mut fields: Vec<Field> = self.schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(ORIGIN_COLUMN, DataType::Utf8, false));
        self.schema = Arc::new(Schema::new(fields));
        self.origin = Some(origin);
        Ok(self)
    }

    /// Schema of the converted batches.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Name of the column that contains the record key.
    pub fn key_column(&self) -> &str {
        &self.key_column
    }

    /// Moves past `rows` input rows that are not converted, so that generated
    /// keys stay equal to the rows' positions.
    pub fn skip(&mut self, rows: u64) {
        self.next_position += rows;
    }

    /// Converts one input batch: projection, generated keys and tensor columns.
    pub fn convert(&mut self, batch: RecordBatch) -> Result<Batch, SourceError> {
        let rows = batch.num_rows();
        let mut columns: Vec<ArrayRef> = Vec::new();
        let positions = self.next_position..self.next_position + rows as u64;
        match &self.generated {
            None => {}
            Some(GeneratedKey::Ordinal) => {
                columns.push(Arc::new(Int64Array::from_iter_values(positions.map(|position| position as i64))));
            }
            Some(GeneratedKey::StreamPosition(stream)) => {
                let keys: StringArray = positions.map(|position| Some(format!("{stream}:{position}"))).collect();
                columns.push(Arc::new(keys));
            }
        }
        self.next_position += rows as u64;

        let mut problems: Vec<Option<String>> = vec![None; rows];
        for &index in &self.projection {
            let column = batch.column(index);
            let name = batch.schema().field(index).name().clone();
            match self.tensors.get(&name) {
                Some(tensor) => columns.push(to_tensor(column, tensor, &name, &mut problems)?),
                None => columns.push(column.clone()),
            }
        }
        if let Some(origin) = &self.origin {
            columns.push(Arc::new(StringArray::from_iter_values(std::iter::repeat_n(&**origin, rows))));
        }
        let data = RecordBatch::try_new(self.schema.clone(), columns).expect("columns match the source schema");
        if self.generated.is_none() {
            let ids = data.column_by_name(&self.key_column).expect("the id column is read");
            for (row, problem) in problems.iter_mut().enumerate() {
                if ids.is_null(row) && problem.is_none() {
                    *problem = Some(format!("the id column {:?} is null", self.key_column));
                }
            }
        }
        if problems.iter().all(Option::is_none) {
            return Ok(Batch::new(data, Vec::new()));
        }

        let keys = Keys::new(&data, &self.key_column).expect("the key column type is checked in Converter::new");
        let rejected = problems
            .iter()
            .enumerate()
            .filter_map(|(row, problem)| {
                problem.as_ref().map(|reason| Rejected {
                    key: keys.get(row),
                    component: String::from("source"),
                    reason: reason.clone(),
                    origin: self.origin.as_deref().map(str::to_string),
                })
            })
            .collect();
        let keep = BooleanArray::from(problems.iter().map(Option::is_none).collect::<Vec<_>>());
        let data = filter_record_batch(&data, &keep).expect("the mask has one entry per row");
        Ok(Batch::new(data, rejected))
    }
}

/// Converts a list column to a tensor column, recording a problem for each
/// null or wrong-length row. Rejected rows are filled with zeros so that the
/// column stays fixed-size until they are filtered out.
fn to_tensor(
    column: &ArrayRef,
    tensor: &TensorType,
    name: &str,
    problems: &mut [Option<String>],
) -> Result<ArrayRef, SourceError> {
    let size = tensor.len();
    let element_type = tensor.element.arrow_type();

    // The common case, a fixed-size list of the right type with no nulls, is
    // re-labelled without copying.
    if let DataType::FixedSizeList(item, list_size) = column.data_type()
        && *list_size as usize == size
        && item.data_type() == &element_type
        && column.null_count() == 0
        && column.as_fixed_size_list().values().null_count() == 0
    {
        let item = Arc::new(Field::new("item", element_type, false));
        let list = FixedSizeListArray::new(item, size as i32, column.as_fixed_size_list().values().clone(), None);
        return Ok(Arc::new(list));
    }

    let mut values = Vec::with_capacity(column.len());
    let cast_error = |err: arrow::error::ArrowError| SourceError::Config {
        path: format!("source.tensors.{name}"),
        message: err.to_string(),
    };
    for (row, row_problem) in problems.iter_mut().enumerate() {
        let item: Option<ArrayRef> = if column.is_null(row) {
            None
        } else {
            Some(match column.data_type() {
                DataType::List(_) => column.as_list::<i32>().value(row),
                DataType::LargeList(_) => column.as_list::<i64>().value(row),
                DataType::FixedSizeList(..) => column.as_fixed_size_list().value(row),
                _ => unreachable!("tensor column types are checked at open"),
            })
        };
        let problem = match &item {
            None => Some(format!("column {name:?} is null")),
            Some(item) if item.len() != size => {
                Some(format!("column {name:?} has {} values, expected {size} for shape {:?}", item.len(), tensor.shape))
            }
            Some(item) if item.null_count() > 0 => Some(format!("column {name:?} contains null values")),
            Some(_) => None,
        };
        match (problem, item) {
            (None, Some(item)) => {
                let converted = cast(&item, &element_type).map_err(cast_error)?;
                values.push(converted);
            }
            (problem, _) => {
                *row_problem = row_problem.take().or(problem);
                values.push(arrow::array::new_null_array(&element_type, size));
            }
        }
    }
    let parts: Vec<&dyn Array> = values.iter().map(|a| a.as_ref()).collect();
    let flat = if parts.is_empty() {
        arrow::array::new_empty_array(&element_type)
    } else {
        arrow::compute::concat(&parts).map_err(cast_error)?
    };
    // Null placeholders in rejected rows become zeros in the flat buffer.
    let result = match tensor.element {
        ElementType::Float32 => tensor::build_f32(tensor, flat.as_primitive::<Float32Type>().values().to_vec()),
        ElementType::UInt8 => {
            tensor::build_u8(tensor, flat.as_primitive::<arrow::datatypes::UInt8Type>().values().to_vec())
        }
        ElementType::UInt16 => {
            tensor::build_u16(tensor, flat.as_primitive::<arrow::datatypes::UInt16Type>().values().to_vec())
        }
    };
    result.map_err(cast_error)
}
