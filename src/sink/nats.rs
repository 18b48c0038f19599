//! The daemon's NATS JetStream output: one message per input message.
//!
//! The rows of an input message (a unit of the `nats` source) are gathered
//! by their `origin` column until the message's last progress mark arrives.
//! They are then published as one Arrow IPC stream on `subject`, with no
//! rows when none remain, and its rejected records as one on the
//! dead-letter subject. Each publication
//! carries the input unit's name as its `Nats-Msg-Id`, and the input
//! message is acknowledged only once the server has stored both.
//!
//! A message can be processed twice when its daemon dies before the
//! acknowledgement and the server hands it to another. Under the randomness
//! contract it comes out the same, and the server drops the second
//! publication as a duplicate within the output stream's duplicate window.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{RecordBatch, StringArray};
use arrow::ipc::writer::StreamWriter;
use async_nats::HeaderMap;
use async_nats::jetstream;

use super::arrow_file::write_options;
use super::{FileFormat, SinkError, dead_letter_schema};
use crate::batch::{Batch, Keys, RecordRuns, Rejected};
use crate::config::NatsSinkConfig;

/// Header that names the input message of an output message.
pub const INPUT_HEADER: &str = "Stochflow-Input";

/// The output stream's subjects and the connection that publishes to them.
pub struct NatsOutput {
    url: String,
    client: async_nats::Client,
    context: jetstream::Context,
    subject: String,
    dead_subject: String,
    max_payload: usize,
}

impl NatsOutput {
    /// Connects, and creates the output stream if it does not exist. An
    /// existing stream must capture both subjects and keep message ids for
    /// at least twice `ack_wait`, the time after which the input's server
    /// hands a message to another daemon.
    pub async fn connect(config: &NatsSinkConfig, ack_wait: Duration) -> Result<Self, crate::source::SourceError> {
        use crate::source::SourceError;
        let problem = |path: &str, message: String| SourceError::Config { path: path.to_string(), message };

        let client = crate::source::connect_nats(&config.url, "sink.url").await?;
        let max_payload = client.server_info().max_payload;
        let context = jetstream::new(client.clone());
        let dead_subject = config.dead_letter_subject();
        let window = (ack_wait * 2).max(Duration::from_secs(120));
        let created = jetstream::stream::Config {
            name: config.stream.clone(),
            subjects: vec![config.subject.clone(), dead_subject.clone()],
            duplicate_window: window,
            ..Default::default()
        };
        let mut stream =
            crate::source::open_nats_stream(&context, created, &config.url, "sink.stream", "output").await?;

        let info = stream.info().await.map_err(|err| {
            problem("sink.stream", format!("cannot read the output stream {:?}: {err}", config.stream))
        })?;
        for (key, subject) in [("sink.subject", &config.subject), ("sink.dead_letter_subject", &dead_subject)] {
            let captured = info.config.subjects.iter().any(|pattern| crate::config::subjects_overlap(pattern, subject));
            if !captured {
                return Err(problem(
                    key,
                    format!(
                        "the output stream {:?} does not store subject {subject:?} (its subjects are {}); add the subject to the stream, or choose one it stores",
                        config.stream,
                        info.config.subjects.join(", ")
                    ),
                ));
            }
        }

        if info.config.duplicate_window < ack_wait * 2 {
            return Err(problem(
                "sink.stream",
                format!(
                    "the output stream {:?} remembers message ids for {} s (its duplicate window), less than twice the input consumer's ack wait of {} s, so a message redelivered after a daemon dies could be written twice; raise the stream's duplicate window to at least {} s",
                    config.stream,
                    info.config.duplicate_window.as_secs_f64(),
                    ack_wait.as_secs_f64(),
                    (ack_wait * 2).as_secs_f64()
                ),
            ));
        }
        Ok(Self {
            url: config.url.clone(),
            client,
            context,
            subject: config.subject.clone(),
            dead_subject,
            max_payload,
        })
    }

    /// Returns the server's address and the connection to it.
    pub fn connection(&self) -> (String, async_nats::Client) {
        (self.url.clone(), self.client.clone())
    }
}

/// The rows and rejected records of one input message.
pub struct UnitOutput {
    pub unit: Arc<str>,
    rows: Vec<RecordBatch>,
    dead: Vec<Rejected>,
    complete: bool,
}

/// Counts of one input message's stored output.
#[derive(Debug, Default)]
pub struct Published {
    pub records: u64,
    pub rows: u64,
    /// The rejected records, by the source or stage that rejected them.
    pub dead_letters: Vec<String>,
    /// Kind (`output` or `dead_letters`) and size of each message stored.
    pub messages: Vec<(&'static str, u64)>,
    /// Whether the server already held the output: the message was
    /// processed before by a daemon that died before acknowledging it.
    pub duplicate: bool,
}

/// Gathers the rows of each input message until it is complete.
pub struct NatsSink {
    format: FileFormat,
    key_column: String,
    units: VecDeque<UnitOutput>,
}

impl NatsSink {
    pub fn new(format: FileFormat, key_column: &str) -> Self {
        Self { format, key_column: key_column.to_string(), units: VecDeque::new() }
    }

    /// Holds a batch's rows and rejections by input message, and returns
    /// the messages that its marks complete, in input order.
    pub fn write(&mut self, batch: Batch) -> Vec<UnitOutput> {
        // Marks come in input order, and a mark rides the batch with its
        // message's last row, so the messages that end here come before any
        // that a row or rejection of this batch starts.
        for mark in &batch.marks {
            self.unit(&mark.unit);
        }

        let data = &batch.data;
        let origins =
            data.column_by_name(crate::batch::ORIGIN_COLUMN).and_then(|c| c.as_any().downcast_ref::<StringArray>());
        let mut start = 0;
        while start < data.num_rows() {
            let origin = origins.map(|o| o.value(start)).unwrap_or("");
            let mut end = start + 1;
            while end < data.num_rows() && origins.map(|o| o.value(end)).unwrap_or("") == origin {
                end += 1;
            }
            self.unit(origin).rows.push(data.slice(start, end - start));
            start = end;
        }
        for rejected in batch.rejected {
            let origin = rejected.origin.clone().unwrap_or_default();
            self.unit(&origin).dead.push(rejected);
        }
        for mark in batch.marks.iter().filter(|mark| mark.complete) {
            self.unit(&mark.unit).complete = true;
        }
        let mut done = Vec::new();
        while self.units.front().is_some_and(|unit| unit.complete) {
            done.push(self.units.pop_front().expect("the front unit exists"));
        }
        done
    }

    fn unit(&mut self, name: &str) -> &mut UnitOutput {
        let index = match self.units.iter().position(|unit| &*unit.unit == name) {
            Some(index) => index,
            None => {
                self.units.push_back(UnitOutput {
                    unit: Arc::from(name),
                    rows: Vec::new(),
                    dead: Vec::new(),
                    complete: false,
                });
                self.units.len() - 1
            }
        };
        &mut self.units[index]
    }

    /// Encodes a unit's output, with no rows when it has none, and its dead
    /// letters. An output above the server's largest message turns its
    /// records into dead letters.
    fn encode(&self, unit: &mut UnitOutput, max_payload: usize) -> Result<Encoded, SinkError> {
        let mut records = RecordRuns::default();
        let record_count: u64 = unit.rows.iter().map(|rows| records.count(rows, &self.key_column)).sum();
        let row_count: u64 = unit.rows.iter().map(|rows| rows.num_rows() as u64).sum();
        let mut output = encode_stream(&self.format, &unit.rows)?;
        let fits = output.len() <= max_payload;
        if !fits {
            let reason = format!(
                "the output of message {} is {} bytes, more than the NATS server's largest message ({max_payload} bytes); publish fewer records per input message, or raise the server's max_payload",
                unit.unit,
                output.len()
            );
            tracing::warn!(input = %unit.unit, "{reason}");
            let mut last: Option<String> = None;
            for rows in &unit.rows {
                let Some(keys) = Keys::new(rows, &self.key_column) else { continue };
                for row in 0..rows.num_rows() {
                    let key = keys.get(row);
                    if last.as_deref() != Some(key.as_str()) {
                        unit.dead.push(Rejected {
                            key: key.clone(),
                            component: String::from("sink"),
                            reason: reason.clone(),
                            origin: Some(unit.unit.to_string()),
                        });
                        last = Some(key);
                    }
                }
            }
            // A retry after a failed publication finds the dead letters alone.
            unit.rows.clear();
            output = encode_stream(&self.format, &[])?;
        }
        let dead = (!unit.dead.is_empty()).then(|| encode_dead_letters(&unit.unit, &unit.dead)).transpose()?;
        let (records, rows) = if fits { (record_count, row_count) } else { (0, 0) };
        Ok(Encoded {
            output,
            dead,
            records,
            rows,
            dead_letters: unit.dead.iter().map(|r| r.component.clone()).collect(),
        })
    }

    /// Publishes a unit's output and dead letters and waits until the server
    /// has stored both.
    pub async fn publish(&self, target: &NatsOutput, unit: &mut UnitOutput) -> Result<Published, SinkError> {
        let encoded = tokio::task::block_in_place(|| self.encode(unit, target.max_payload))?;
        let mut published = Published {
            records: encoded.records,
            rows: encoded.rows,
            dead_letters: encoded.dead_letters,
            ..Default::default()
        };
        let sends = [
            ("output", &target.subject, String::from(&*unit.unit), Some(encoded.output)),
            ("dead_letters", &target.dead_subject, format!("{}:dead", unit.unit), encoded.dead),
        ];
        for (kind, subject, id, payload) in sends {
            let Some(payload) = payload else { continue };
            let size = payload.len() as u64;
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            headers.insert(INPUT_HEADER, &*unit.unit);
            let failed = |err: &dyn std::fmt::Display| SinkError::Nats {
                message: format!(
                    "cannot store the {} of message {} on subject {subject}: {err}",
                    kind.replace('_', " "),
                    unit.unit
                ),
            };
            let ack = target
                .context
                .publish_with_headers(subject.clone(), headers, payload.into())
                .await
                .map_err(|err| failed(&err))?
                .await
                .map_err(|err| failed(&err))?;
            published.duplicate |= ack.duplicate;
            published.messages.push((kind, size));
        }
        Ok(published)
    }
}

struct Encoded {
    output: Vec<u8>,
    dead: Option<Vec<u8>>,
    records: u64,
    rows: u64,
    dead_letters: Vec<String>,
}

/// Writes batches as one Arrow IPC stream, with the output's columns and
/// compression.
fn encode_stream(format: &FileFormat, batches: &[RecordBatch]) -> Result<Vec<u8>, SinkError> {
    let failed =
        |err: arrow::error::ArrowError| SinkError::Nats { message: format!("cannot encode the output: {err}") };
    let options = write_options(format.compression).map_err(failed)?;
    let mut writer = StreamWriter::try_new_with_options(Vec::new(), &format.schema, options).map_err(failed)?;
    for batch in batches {
        let projected = batch.project(&format.projection).map_err(failed)?;
        let projected = RecordBatch::try_new(format.schema.clone(), projected.columns().to_vec()).map_err(failed)?;
        writer.write(&projected).map_err(failed)?;
    }
    writer.into_inner().map_err(failed)
}

fn encode_dead_letters(unit: &str, dead: &[Rejected]) -> Result<Vec<u8>, SinkError> {
    let schema = dead_letter_schema();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(dead.iter().map(|r| r.key.as_str()))),
            Arc::new(StringArray::from_iter_values(dead.iter().map(|r| r.origin.as_deref().unwrap_or(unit)))),
            Arc::new(StringArray::from_iter_values(dead.iter().map(|r| r.component.as_str()))),
            Arc::new(StringArray::from_iter_values(dead.iter().map(|r| r.reason.as_str()))),
        ],
    )
    .expect("the dead-letter columns match their schema");
    let format = FileFormat {
        schema,
        projection: vec![0, 1, 2, 3],
        compression: super::FileCompression::default(),
        rows_per_batch: dead.len(),
    };
    encode_stream(&format, &[batch])
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;
    use crate::batch::Mark;

    fn batch(ids: &[i64], origins: &[&str]) -> Batch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("origin", DataType::Utf8, false),
        ]));
        let data = RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from(ids.to_vec())), Arc::new(StringArray::from(origins.to_vec()))],
        )
        .unwrap();
        Batch::new(data, Vec::new())
    }

    fn sink() -> NatsSink {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let format = FileFormat { schema, projection: vec![0], compression: Default::default(), rows_per_batch: 16 };
        NatsSink::new(format, "id")
    }

    fn ids(unit: &UnitOutput) -> Vec<i64> {
        unit.rows
            .iter()
            .flat_map(|rows| rows.column(0).as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec())
            .collect()
    }

    #[test]
    fn rows_split_by_input_message() {
        let mut sink = sink();
        let mut first = batch(&[1, 2, 3], &["in:1", "in:1", "in:2"]);
        first.marks.push(Mark { unit: Arc::from("in:1"), records: 2, complete: true });
        let done = sink.write(first);
        assert_eq!(done.len(), 1);
        assert_eq!(&*done[0].unit, "in:1");
        assert_eq!(ids(&done[0]), [1, 2]);

        let mut second = batch(&[4], &["in:2"]);
        second.rejected.push(Rejected {
            key: String::from("5"),
            component: String::from("infer"),
            reason: String::from("bad"),
            origin: Some(String::from("in:2")),
        });
        assert!(sink.write(second).is_empty(), "in:2 has no complete mark yet");
        let mut last = batch(&[], &[]);
        last.marks.push(Mark { unit: Arc::from("in:2"), records: 3, complete: true });
        let done = sink.write(last);
        assert_eq!(done.len(), 1);
        assert_eq!(ids(&done[0]), [3, 4]);
        assert_eq!(done[0].dead.len(), 1);
    }

    #[test]
    fn messages_released_in_input_order() {
        let mut sink = sink();
        // Rejected messages 2 and 3 ride the batch that contains message 4's rows.
        let mut batch = batch(&[7, 8], &["in:4", "in:4"]);
        for unit in ["in:2", "in:3"] {
            batch.rejected.push(Rejected {
                key: unit.to_string(),
                component: String::from("source"),
                reason: String::from("not Arrow"),
                origin: Some(unit.to_string()),
            });
        }
        for unit in ["in:2", "in:3", "in:4"] {
            batch.marks.push(Mark { unit: Arc::from(unit), records: 1, complete: true });
        }
        let done: Vec<String> = sink.write(batch).iter().map(|unit| unit.unit.to_string()).collect();
        assert_eq!(done, ["in:2", "in:3", "in:4"]);
    }

    #[test]
    fn output_above_the_largest_message_becomes_dead_letters() {
        let sink = sink();
        let mut unit = UnitOutput {
            unit: Arc::from("in:7"),
            rows: vec![batch(&[1, 2, 2, 3], &["in:7"; 4]).data],
            dead: Vec::new(),
            complete: true,
        };
        let encoded = sink.encode(&mut unit, 200).unwrap();
        let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(encoded.output), None).unwrap();
        assert_eq!(reader.map(|b| b.unwrap().num_rows()).sum::<usize>(), 0, "the output message has no rows");
        assert_eq!((encoded.records, encoded.rows), (0, 0));
        let keys: Vec<&str> = unit.dead.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["1", "2", "3"], "one dead letter per record");
        assert!(unit.dead[0].reason.contains("largest message"));
        assert!(encoded.dead.is_some());

        assert!(unit.rows.is_empty(), "a retry publishes the dead letters alone");
        let rows = vec![batch(&[1, 2, 2, 3], &["in:8"; 4]).data];
        let mut unit = UnitOutput { unit: Arc::from("in:8"), rows, dead: Vec::new(), complete: true };
        let encoded = sink.encode(&mut unit, 1 << 20).unwrap();
        let payload = encoded.output;
        let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(payload), None).unwrap();
        let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
        assert_eq!(rows, 4);
        assert_eq!((encoded.records, encoded.rows), (4, 4), "without a sample column, each row is a record");
        assert!(encoded.dead.is_none());
    }
}
