//! Tensor columns in Arrow record batches.
//!
//! A tensor column contains one fixed-shape tensor per row as a
//! `FixedSizeList<T>` whose field carries the canonical
//! `arrow.fixed_shape_tensor` extension type, with the per-row shape in the
//! field metadata. The flat values of a whole column are one contiguous
//! buffer, so they can be viewed as `[rows, shape...]` without copying.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, ArrowPrimitiveType, AsArray, FixedSizeListArray, PrimitiveArray};
use arrow::buffer::ScalarBuffer;
use arrow::datatypes::{DataType, Field, Float32Type, UInt8Type, UInt16Type};
use arrow::error::ArrowError;
use std::collections::HashMap;

const EXTENSION_NAME_KEY: &str = "ARROW:extension:name";
const EXTENSION_METADATA_KEY: &str = "ARROW:extension:metadata";
const FIXED_SHAPE_TENSOR: &str = "arrow.fixed_shape_tensor";

/// Element type of a tensor column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElementType {
    Float32,
    UInt8,
    UInt16,
}

impl ElementType {
    /// Returns the Arrow type of one element.
    pub fn arrow_type(self) -> DataType {
        match self {
            ElementType::Float32 => DataType::Float32,
            ElementType::UInt8 => DataType::UInt8,
            ElementType::UInt16 => DataType::UInt16,
        }
    }

    /// Maps an Arrow element type to a tensor element type, if supported.
    pub fn from_arrow(data_type: &DataType) -> Option<Self> {
        match data_type {
            DataType::Float32 => Some(ElementType::Float32),
            DataType::UInt8 => Some(ElementType::UInt8),
            DataType::UInt16 => Some(ElementType::UInt16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ElementType::Float32 => "float32",
            ElementType::UInt8 => "uint8",
            ElementType::UInt16 => "uint16",
        }
    }
}

/// The type of a tensor column: element type and per-row shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorType {
    pub element: ElementType,
    pub shape: Vec<usize>,
}

impl TensorType {
    pub fn new(element: ElementType, shape: Vec<usize>) -> Self {
        Self { element, shape }
    }

    /// Number of elements in one row's tensor.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Builds the Arrow field for a column of this type.
    ///
    /// The extension metadata is written by hand as `{"shape":[...]}`:
    /// arrow-rs 60 serializes absent dimension names as `null`, which
    /// pyarrow 26 rejects.
    pub fn field(&self, name: &str) -> Field {
        let item = Arc::new(Field::new("item", self.element.arrow_type(), false));
        let metadata = HashMap::from([
            (String::from(EXTENSION_NAME_KEY), String::from(FIXED_SHAPE_TENSOR)),
            (String::from(EXTENSION_METADATA_KEY), serde_json::json!({ "shape": self.shape }).to_string()),
        ]);
        Field::new(name, DataType::FixedSizeList(item, self.len() as i32), false).with_metadata(metadata)
    }

    /// Reads the tensor type of a field: the extension type's shape when the
    /// field has one, else a one-dimensional shape of the list size.
    pub fn of_field(field: &Field) -> Option<Self> {
        let DataType::FixedSizeList(item, size) = field.data_type() else {
            return None;
        };
        let element = ElementType::from_arrow(item.data_type())?;
        let shape = declared_shape(field).unwrap_or_else(|| vec![*size as usize]);
        Some(Self { element, shape })
    }

    pub fn describe(&self) -> String {
        format!("{}{:?}", self.element.name(), self.shape)
    }
}

/// Reads the shape a field declares with the `arrow.fixed_shape_tensor`
/// extension type, whatever its element type. A shape whose element count
/// differs from the list size is ignored.
pub fn declared_shape(field: &Field) -> Option<Vec<usize>> {
    let DataType::FixedSizeList(_, size) = field.data_type() else {
        return None;
    };
    let metadata = field.metadata();
    if metadata.get(EXTENSION_NAME_KEY).map(String::as_str) != Some(FIXED_SHAPE_TENSOR) {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(metadata.get(EXTENSION_METADATA_KEY)?).ok()?;
    let shape: Vec<usize> = serde_json::from_value(value.get("shape")?.clone()).ok()?;
    (shape.iter().product::<usize>() == *size as usize).then_some(shape)
}

/// Returns the flat values of a fixed-size-list column of primitive `T`.
/// Slicing a `FixedSizeListArray` slices its child, so the child's values are
/// exactly the column's rows.
pub fn values<T: ArrowPrimitiveType>(column: &ArrayRef) -> Result<&[T::Native], ArrowError> {
    let list = column.as_any().downcast_ref::<FixedSizeListArray>().ok_or_else(|| {
        ArrowError::InvalidArgumentError(format!("expected a tensor column, found {}", column.data_type()))
    })?;
    let size = list.value_length() as usize;
    let items = list.values().as_any().downcast_ref::<PrimitiveArray<T>>().ok_or_else(|| {
        ArrowError::InvalidArgumentError(format!(
            "expected {} tensor values, found {}",
            T::DATA_TYPE,
            list.values().data_type()
        ))
    })?;
    Ok(&items.values()[..list.len() * size])
}

/// Takes the flat values of a fixed-size-list column of primitive `T`, for
/// changing them in place. A column built by [`build`] and not shared gives
/// its own buffer, as does its slice from the first row. Any other column
/// gives a copy.
pub fn into_values<T: ArrowPrimitiveType>(column: ArrayRef) -> Result<Vec<T::Native>, ArrowError> {
    let len = values::<T>(&column)?.len();
    let list = column.as_fixed_size_list().clone();
    drop(column);
    let items = {
        let (_, _, items, _) = list.into_parts();
        items.as_primitive::<T>().clone()
    };
    let (_, buffer, _) = items.into_parts();
    match buffer.into_inner().into_vec::<T::Native>() {
        Ok(mut values) => {
            values.truncate(len);
            Ok(values)
        }
        Err(shared) => Ok(shared.typed_data::<T::Native>()[..len].to_vec()),
    }
}

/// Formats the position of element `flat` of a row-major tensor of `shape`
/// as an index counted from 0, such as `[1, 10, 20]`.
pub fn index_text(shape: &[usize], flat: usize) -> String {
    let mut rest = flat;
    let mut index = vec![0; shape.len()];
    for (slot, &size) in index.iter_mut().zip(shape).rev() {
        let size = size.max(1);
        *slot = rest % size;
        rest /= size;
    }
    format!("{index:?}")
}

/// Returns the float32 values of a tensor column.
pub fn f32_values(column: &ArrayRef) -> Result<&[f32], ArrowError> {
    values::<Float32Type>(column)
}

/// Returns the uint8 values of a tensor column.
pub fn u8_values(column: &ArrayRef) -> Result<&[u8], ArrowError> {
    values::<UInt8Type>(column)
}

/// Returns the uint16 values of a tensor column.
pub fn u16_values(column: &ArrayRef) -> Result<&[u16], ArrowError> {
    values::<UInt16Type>(column)
}

/// Builds a tensor column from flat values, taking ownership without a copy.
pub fn build<T: ArrowPrimitiveType>(tensor: &TensorType, values: Vec<T::Native>) -> Result<ArrayRef, ArrowError> {
    let field = Arc::new(Field::new("item", T::DATA_TYPE, false));
    let items = PrimitiveArray::<T>::new(ScalarBuffer::from(values), None);
    let list = FixedSizeListArray::try_new(field, tensor.len() as i32, Arc::new(items), None)?;
    Ok(Arc::new(list))
}

/// Builds a float32 tensor column.
pub fn build_f32(tensor: &TensorType, values: Vec<f32>) -> Result<ArrayRef, ArrowError> {
    build::<Float32Type>(tensor, values)
}

/// Builds a uint8 tensor column.
pub fn build_u8(tensor: &TensorType, values: Vec<u8>) -> Result<ArrayRef, ArrowError> {
    build::<UInt8Type>(tensor, values)
}

/// Builds a uint16 tensor column.
pub fn build_u16(tensor: &TensorType, values: Vec<u16>) -> Result<ArrayRef, ArrowError> {
    build::<UInt16Type>(tensor, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn into_values_reuses_an_unshared_buffer() {
        let tensor = TensorType::new(ElementType::Float32, vec![2]);
        let column = build_f32(&tensor, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let start = f32_values(&column).unwrap().as_ptr();
        let values = into_values::<Float32Type>(column).unwrap();
        assert_eq!(values, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(values.as_ptr(), start, "an unshared column's buffer is taken without a copy");

        let shared = build_f32(&tensor, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let mut copy = into_values::<Float32Type>(shared.clone()).unwrap();
        copy[0] = 9.0;
        assert_eq!(f32_values(&shared).unwrap(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "a shared column is left as it was");

        let sliced = shared.slice(1, 2);
        drop(shared);
        assert_eq!(into_values::<Float32Type>(sliced).unwrap(), [3.0, 4.0, 5.0, 6.0]);
        let head = build_f32(&tensor, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap().slice(0, 2);
        assert_eq!(into_values::<Float32Type>(head).unwrap(), [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn index_text_counts_row_major() {
        assert_eq!(index_text(&[3, 64, 64], 4756), "[1, 10, 20]");
        assert_eq!(index_text(&[64], 17), "[17]");
        assert_eq!(index_text(&[2, 3], 0), "[0, 0]");
    }

    #[test]
    fn field_roundtrips_shape() {
        let tensor = TensorType::new(ElementType::Float32, vec![3, 4, 5]);
        let field = tensor.field("image");
        assert_eq!(TensorType::of_field(&field), Some(tensor));
        assert_eq!(field.extension_type_name(), Some("arrow.fixed_shape_tensor"));
        assert_eq!(field.metadata()["ARROW:extension:metadata"], r#"{"shape":[3,4,5]}"#);
    }

    #[test]
    fn values_follow_slices() {
        let tensor = TensorType::new(ElementType::Float32, vec![2]);
        let column = build_f32(&tensor, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        let sliced = column.slice(1, 2);
        assert_eq!(f32_values(&sliced).unwrap(), &[2.0, 3.0, 4.0, 5.0]);
    }
}
