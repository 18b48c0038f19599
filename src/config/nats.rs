//! Checks of the `nats` source and sink that need no server: names, the
//! pairing of the two, and subjects that would feed the output back in.

use super::load::ConfigProblem;
use super::{SinkConfig, SourceConfig};

/// Checks the `nats` settings of the source and the sink, when either is
/// present.
pub fn check(source: Option<&SourceConfig>, sink: Option<&SinkConfig>) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    let nats_source = match source {
        Some(SourceConfig::Nats(c)) => Some(c),
        _ => None,
    };
    let nats_sink = match sink {
        Some(SinkConfig::Nats(c)) => Some(c),
        _ => None,
    };
    if let Some(source) = nats_source {
        check_url(&mut problems, "source.url", &source.url);
        check_stream(&mut problems, "source.stream", &source.stream);
        check_subject(&mut problems, "source.subject", &source.subject, true);
        if let Some(problem) = name_problem(&source.consumer) {
            problems.push(ConfigProblem::new("source.consumer", problem));
        }
        if source.fetch == 0 {
            problems.push(ConfigProblem::new("source.fetch", "must be at least 1, found 0"));
        }
        if source.ack_wait_ms < 1000 {
            problems.push(ConfigProblem::new(
                "source.ack_wait_ms",
                format!(
                    "must be at least 1000, found {}; a message not acknowledged in time goes to another daemon, so leave time for a whole message to pass through the pipeline",
                    source.ack_wait_ms
                ),
            ));
        }
    }
    if let Some(sink) = nats_sink {
        check_url(&mut problems, "sink.url", &sink.url);
        check_stream(&mut problems, "sink.stream", &sink.stream);
        check_subject(&mut problems, "sink.subject", &sink.subject, false);
        if let Some(dead) = &sink.dead_letter_subject {
            check_subject(&mut problems, "sink.dead_letter_subject", dead, false);
            if *dead == sink.subject {
                problems.push(ConfigProblem::new(
                    "sink.dead_letter_subject",
                    "is the same as `sink.subject`; dead letters need a subject of their own",
                ));
            }
        }
    }
    match (source, sink, nats_source, nats_sink) {
        (Some(_), Some(SinkConfig::ArrowFile(_)), Some(_), None) => problems.push(ConfigProblem::new(
            "sink.kind",
            "a `nats` source acknowledges each message once its output is stored in JetStream, so it needs a `nats` sink",
        )),
        (Some(source), Some(_), None, Some(_)) => problems.push(ConfigProblem::new(
            "sink.kind",
            format!(
                "a `nats` sink writes the output of a `nats` source's messages, and the source is {}; use `source.kind: nats`, or an `arrow_file` sink",
                source.kind()
            ),
        )),
        (_, _, Some(source), Some(sink)) => {
            let dead = sink.dead_letter_subject();
            let subjects = [("sink.subject", &sink.subject, "output"), ("sink.dead_letter_subject", &dead, "dead letters")];
            for (key, subject, what) in subjects {
                if subjects_overlap(&source.subject, subject) {
                    problems.push(ConfigProblem::new(
                        key,
                        format!(
                            "{subject:?} overlaps the input subject {:?}, so the {what} would be read again as input; choose a subject outside it",
                            source.subject
                        ),
                    ));
                }
            }
            if source.stream == sink.stream {
                problems.push(ConfigProblem::new(
                    "sink.stream",
                    format!(
                        "{:?} is also the input stream; the output needs a stream of its own, so that the input's consumer never reads it",
                        sink.stream
                    ),
                ));
            }
        }
        _ => {}
    }
    problems
}

fn check_url(problems: &mut Vec<ConfigProblem>, key: &str, url: &str) {
    let scheme_ok = ["nats://", "tls://"].iter().any(|scheme| url.starts_with(scheme));
    if !scheme_ok || url.len() <= "nats://".len() {
        problems.push(ConfigProblem::new(
            key,
            format!(
                "{url:?} is not a NATS server address; write it as nats://HOST:PORT, such as nats://127.0.0.1:4222"
            ),
        ));
    }
}

fn check_stream(problems: &mut Vec<ConfigProblem>, key: &str, name: &str) {
    if let Some(problem) = name_problem(name) {
        problems.push(ConfigProblem::new(key, problem));
    }
}

/// Returns what is wrong with a stream or consumer name, which JetStream
/// restricts to printable characters without spaces, dots, `*`, `>`,
/// slashes and backslashes.
fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some(String::from("is empty; give a name such as \"digits\""));
    }
    let bad = name.chars().find(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'));
    bad.map(|c| {
        format!("{name:?} contains {c:?}, which JetStream names cannot contain; use letters, digits, `-` and `_`")
    })
}

/// Checks a subject. Wildcards are allowed where the subject filters input,
/// not where output is published.
fn check_subject(problems: &mut Vec<ConfigProblem>, key: &str, subject: &str, wildcards: bool) {
    let tokens: Vec<&str> = subject.split('.').collect();
    let problem = if subject.is_empty() {
        Some(String::from("is empty; give a subject such as \"digits.in\""))
    } else if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some(format!("{subject:?} contains a space; NATS subjects cannot contain spaces"))
    } else if tokens.iter().any(|token| token.is_empty()) {
        Some(format!("{subject:?} has an empty part between dots; write it as parts joined by single dots"))
    } else if !wildcards && tokens.iter().any(|token| *token == "*" || *token == ">") {
        Some(format!("{subject:?} contains a wildcard; output is published to one subject, so name it in full"))
    } else if let Some(position) = tokens.iter().position(|token| *token == ">")
        && position + 1 != tokens.len()
    {
        Some(format!("{subject:?} has `>` before its last part; `>` can only end a subject"))
    } else {
        None
    };
    if let Some(problem) = problem {
        problems.push(ConfigProblem::new(key, problem));
    }
}

/// Returns whether some subject matches both patterns (`*` matches one
/// token, a final `>` one or more).
pub fn subjects_overlap(a: &str, b: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
    let mut i = 0;
    loop {
        match (a.get(i), b.get(i)) {
            (Some(&">"), Some(_)) | (Some(_), Some(&">")) => return true,
            (Some(x), Some(y)) if x == y || *x == "*" || *y == "*" => i += 1,
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_subjects() {
        assert!(subjects_overlap("digits.in", "digits.in"));
        assert!(subjects_overlap("digits.>", "digits.out"));
        assert!(subjects_overlap("digits.*", "digits.out"));
        assert!(subjects_overlap("*.out", "digits.*"));
        assert!(!subjects_overlap("digits.in", "digits.out"));
        assert!(!subjects_overlap("digits.*", "digits.out.dead"));
        assert!(subjects_overlap("digits.>", "digits.out.dead"));
        assert!(!subjects_overlap("digits.in", "digits.in.dead"));
        assert!(!subjects_overlap("digits", "digits.out"));
    }

    #[test]
    fn names_and_subjects() {
        assert!(name_problem("digits-in_2").is_none());
        assert!(name_problem("digits.in").unwrap().contains("'.'"));
        assert!(name_problem("").unwrap().contains("empty"));
        let mut problems = Vec::new();
        check_subject(&mut problems, "k", "a..b", true);
        check_subject(&mut problems, "k", "a.>.b", true);
        check_subject(&mut problems, "k", "a.*", false);
        check_subject(&mut problems, "k", "a b", true);
        check_subject(&mut problems, "k", "a.*.>", true);
        let messages: Vec<String> = problems.iter().map(|p| p.message.clone()).collect();
        assert_eq!(messages.len(), 4, "{messages:?}");
        assert!(messages[0].contains("empty part"));
        assert!(messages[1].contains("`>` can only end"));
        assert!(messages[2].contains("wildcard"));
        assert!(messages[3].contains("space"));
    }
}
