//! A server-sent events parser (the brain's `GET /v1/events`): bytes in as
//! they arrive, whole events out. Pure, no I/O.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// The `event:` field; `message` when the stream names none.
    pub name: String,
    /// The `data:` lines, joined with '\n'.
    pub data: String,
    /// The `id:` field, if the event had one.
    pub id: Option<String>,
}

/// Parses a stream of bytes into [`Event`]s. Comments (`: …`) and `retry:`
/// are skipped; a blank line dispatches the event gathered so far.
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
    name: Option<String>,
    data: Option<String>,
    id: Option<String>,
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds `bytes`; returns the events they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Event> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&raw[..end]);
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if let Some(ev) = self.line(line) {
                out.push(ev);
            }
        }
        out
    }

    fn line(&mut self, line: &str) -> Option<Event> {
        if line.is_empty() {
            let data = self.data.take();
            let name = self.name.take();
            let id = self.id.take();
            // An event without data is not dispatched (as in the spec).
            return data.map(|data| Event {
                name: name.unwrap_or_else(|| "message".into()),
                data,
                id,
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.name = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "id" => self.id = Some(value.to_owned()),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads_come_out_whole() {
        let stream = "retry: 2000\n: corral brain events after revision 3\n\n\
                      id: 4\nevent: app.created\ndata: {\"a\":1}\n\n\
                      : keep-alive\n\n\
                      event: lagged\ndata: {\"missed\":2}\n\n";
        // Every split point gives the same events.
        for cut in 0..stream.len() {
            let mut p = Parser::new();
            let mut evs = p.push(&stream.as_bytes()[..cut]);
            evs.extend(p.push(&stream.as_bytes()[cut..]));
            assert_eq!(
                evs,
                vec![
                    Event {
                        name: "app.created".into(),
                        data: "{\"a\":1}".into(),
                        id: Some("4".into()),
                    },
                    Event {
                        name: "lagged".into(),
                        data: "{\"missed\":2}".into(),
                        id: None,
                    },
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn multi_line_data_crlf_and_unnamed_events() {
        let mut p = Parser::new();
        let evs = p.push(b"data: one\r\ndata:two\r\n\r\ndata\n\n");
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].name, "message");
        assert_eq!(evs[0].data, "one\ntwo");
        assert_eq!(evs[1].data, "");
    }
}
