//! Maps paths in a YAML document (`stages[1].std`) to their line and column,
//! so that errors found after deserialization can still name the YAML line.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Line and column (both 1-based) of every key and sequence item in a document.
/// yaml-rust2 0.13 reports lines from 1 and columns from 0; columns are
/// shifted here.
#[derive(Clone, Debug, Default)]
pub struct Locator {
    positions: HashMap<String, (usize, usize)>,
    duplicates: Vec<Duplicate>,
}

/// A key given again in the same mapping.
#[derive(Clone, Debug, PartialEq)]
pub struct Duplicate {
    /// The key, such as `std`.
    pub key: String,
    /// The key's path, such as `stages[0].std`.
    pub path: String,
    /// Line and column of the repeat.
    pub position: (usize, usize),
    /// Line and column of the key's first value.
    pub first: (usize, usize),
}

impl Locator {
    /// Indexes a YAML document. A document that does not parse yields an
    /// empty index: the deserializer reports that error with its own position.
    pub fn new(text: &str) -> Self {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut builder, false).is_err() {
            return Self::default();
        }
        Self { positions: builder.positions, duplicates: builder.duplicates }
    }

    /// Keys given more than once in the same mapping, each repeat once, in
    /// the order of the document.
    pub fn duplicates(&self) -> &[Duplicate] {
        &self.duplicates
    }

    /// Returns the position of `path`, or of its nearest ancestor that is in
    /// the document (a missing key is reported at its parent).
    pub fn find(&self, path: &str) -> Option<(usize, usize)> {
        let mut candidate = path;
        loop {
            if let Some(position) = self.positions.get(candidate) {
                return Some(*position);
            }
            let cut = candidate.rfind(['.', '['])?;
            candidate = &candidate[..cut];
        }
    }
}

enum Container {
    /// `seen` contains the mapping's keys so far, with their positions.
    Mapping {
        expecting_key: bool,
        key: Option<String>,
        seen: HashMap<String, (usize, usize)>,
    },
    Sequence {
        index: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<(String, Container)>,
    positions: HashMap<String, (usize, usize)>,
    duplicates: Vec<Duplicate>,
}

impl Builder {
    /// Computes the path of the node that starts now and records its position
    /// when it is a sequence item. Returns `None` when the node is a mapping key.
    fn enter_node(&mut self, mark: Marker) -> Option<String> {
        let Some((parent, container)) = self.stack.last_mut() else {
            return Some(String::new());
        };
        match container {
            Container::Mapping { expecting_key: true, .. } => None,
            Container::Mapping { expecting_key, key, .. } => {
                *expecting_key = true;
                let key = key.take().unwrap_or_default();
                Some(if parent.is_empty() { key } else { format!("{parent}.{key}") })
            }
            Container::Sequence { index } => {
                let path = format!("{parent}[{index}]");
                *index += 1;
                self.positions.insert(path.clone(), (mark.line(), mark.col() + 1));
                Some(path)
            }
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        match event {
            Event::Scalar(value, ..) => {
                if self.enter_node(mark).is_some() {
                    // A value, or a sequence item: nothing more to record.
                    return;
                }
                let (parent, container) = self.stack.last_mut().expect("a key is inside a mapping");
                let path = if parent.is_empty() { value.clone() } else { format!("{parent}.{value}") };
                let position = (mark.line(), mark.col() + 1);
                let Container::Mapping { expecting_key, key, seen } = container else {
                    unreachable!("only a mapping expects a key")
                };
                match seen.get(&value) {
                    Some(&first) => self.duplicates.push(Duplicate { key: value.clone(), path, position, first }),
                    None => {
                        seen.insert(value.clone(), position);
                        self.positions.insert(path, position);
                    }
                }
                *expecting_key = false;
                *key = Some(value);
            }
            Event::MappingStart(..) => {
                let path = self.enter_node(mark).unwrap_or_default();
                self.stack.push((path, Container::Mapping { expecting_key: true, key: None, seen: HashMap::new() }));
            }
            Event::SequenceStart(..) => {
                let path = self.enter_node(mark).unwrap_or_default();
                self.stack.push((path, Container::Sequence { index: 0 }));
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Alias(_) => {
                self.enter_node(mark);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "seed: 1\nsource:\n  kind: npy\n  path: x.npy\nstages:\n  - kind: add_noise\n    std: 0.1\n  - kind: infer\n    inputs: {x: y}\n";

    #[test]
    fn finds_nested_keys() {
        let locator = Locator::new(TEXT);
        assert_eq!(locator.find("seed"), Some((1, 1)));
        assert_eq!(locator.find("source.path"), Some((4, 3)));
        assert_eq!(locator.find("stages[0].std"), Some((7, 5)));
        assert_eq!(locator.find("stages[1].inputs.x"), Some((9, 14)));
    }

    #[test]
    fn missing_key_falls_back_to_parent() {
        let locator = Locator::new(TEXT);
        assert_eq!(locator.find("stages[1].model"), locator.find("stages[1]"));
        assert_eq!(locator.find("stages[1]").map(|p| p.0), Some(8));
    }

    #[test]
    fn repeated_keys_are_listed_at_the_repeat() {
        let text = "seed: 1\nstages:\n  - kind: add_noise\n    std: 0.1\n    std: 0.2\n    std: 0.3\n  - {kind: infer, kind: sample}\nseed: 2\n";
        let locator = Locator::new(text);
        let found: Vec<String> = locator
            .duplicates()
            .iter()
            .map(|d| format!("{} {}:{} first {}:{}", d.path, d.position.0, d.position.1, d.first.0, d.first.1))
            .collect();
        assert_eq!(
            found,
            [
                "stages[0].std 5:5 first 4:5",
                "stages[0].std 6:5 first 4:5",
                "stages[1].kind 7:19 first 7:6",
                "seed 8:1 first 1:1",
            ]
        );
        // The first occurrence keeps its position.
        assert_eq!(locator.find("stages[0].std"), Some((4, 5)));
    }

    #[test]
    fn equal_keys_in_different_mappings_are_no_repeat() {
        let locator = Locator::new("a: {x: 1}\nb: {x: 2}\nc: [{x: 1}, {x: 2}]\n");
        assert!(locator.duplicates().is_empty(), "{:?}", locator.duplicates());
    }
}
