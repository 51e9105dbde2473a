//! PostgreSQL binary `COPY` encoding, done by hand into large buffers, and the `event` row
//! format (the dedup claim around it is in `claim.rs`).
//!
//! tokio-postgres' `BinaryCopyInWriter` sends a message every 4 KB and goes through the
//! generic `ToSql` machinery per value; encoding the tuples ourselves into multi-megabyte
//! chunks and handing them to `CopyInSink` saves both (figures in docs/writer.md).

use std::net::IpAddr;

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::SinkExt;
use sluice_schema::messages::EventMessage;
use sluice_schema::messages::RawObject;
use tokio_postgres::Transaction;
use uuid::Uuid;

use crate::decode::JsonObject;

/// A `jsonb` column's value: a map, serialised into the stream, or an object's text as it
/// came from Kafka.
pub trait Jsonb {
    /// Appends the JSON text to `out`.
    fn put_json(&self, out: &mut BytesMut) -> serde_json::Result<()>;
}

impl Jsonb for JsonObject {
    fn put_json(&self, out: &mut BytesMut) -> serde_json::Result<()> {
        serde_json::to_writer(out.writer(), self)
    }
}

impl Jsonb for RawObject {
    fn put_json(&self, out: &mut BytesMut) -> serde_json::Result<()> {
        out.put_slice(self.get().as_bytes());
        Ok(())
    }
}

/// Size at which an encoded chunk is sent to the server.
pub const CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The number of columns in the column list of a `COPY table (a, b, ...) FROM ...` statement:
/// the encoder takes its tuple width from the statement it feeds, so the two cannot disagree.
/// Evaluated at compile time for the constants; a statement without a list counts 0.
pub const fn columns_of(statement: &str) -> i16 {
    let b = statement.as_bytes();
    let mut i = 0;
    while i < b.len() && b[i] != b'(' {
        i += 1;
    }
    if i == b.len() {
        return 0;
    }
    let mut columns = 1;
    while i < b.len() && b[i] != b')' {
        if b[i] == b',' {
            columns += 1;
        }
        i += 1;
    }
    columns
}

/// Builds one `COPY ... FROM STDIN (FORMAT binary)` stream for one statement.
pub(crate) struct CopyEncoder {
    /// The chunk being filled.
    buf: BytesMut,
    /// Chunks full and ready to send.
    done: Vec<Bytes>,
    /// The `COPY` statement the stream is for.
    statement: &'static str,
    /// Columns per tuple (of `statement`'s column list), written at the start of each row.
    columns: i16,
    /// Fields written in the current row, checked against `columns` in debug builds.
    fields: i16,
    /// Rows encoded so far.
    pub rows: u64,
}

impl CopyEncoder {
    /// Starts a stream for `statement`, whose column list gives the fields per tuple.
    pub fn new(statement: &'static str) -> CopyEncoder {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        buf.put_slice(b"PGCOPY\n\xff\r\n\0");
        buf.put_i32(0); // flags
        buf.put_i32(0); // header extension length
        CopyEncoder {
            buf,
            done: Vec::new(),
            statement,
            columns: columns_of(statement),
            fields: 0,
            rows: 0,
        }
    }

    /// Starts a tuple; the caller then writes exactly `columns` fields.
    pub fn row(&mut self) {
        self.check_row_complete();
        if self.buf.len() >= CHUNK_BYTES {
            self.done.push(self.buf.split().freeze());
        }
        self.buf.put_i16(self.columns);
        self.rows += 1;
        self.fields = 0;
    }

    /// A row with fewer or more fields than the statement's columns is refused by PostgreSQL
    /// for the whole batch; debug builds (every test) name the mistake where it is made.
    fn check_row_complete(&self) {
        debug_assert!(
            self.rows == 0 || self.fields == self.columns,
            "a COPY row got {} fields for {} columns: {}",
            self.fields,
            self.columns,
            self.statement
        );
    }

    /// Starts a field: its length on the wire (-1 for NULL).
    fn field(&mut self, len: i32) {
        self.fields += 1;
        debug_assert!(
            self.rows > 0 && self.fields <= self.columns,
            "COPY field {} outside a row of {} columns: {}",
            self.fields,
            self.columns,
            self.statement
        );
        self.buf.put_i32(len);
    }

    /// A NULL field.
    pub fn null(&mut self) {
        self.field(-1);
    }

    /// `bigint`.
    pub fn i64(&mut self, v: i64) {
        self.field(8);
        self.buf.put_i64(v);
    }

    /// `boolean`.
    pub fn bool(&mut self, v: bool) {
        self.field(1);
        self.buf.put_u8(u8::from(v));
    }

    /// `timestamptz`.
    pub fn ts(&mut self, v: DateTime<Utc>) {
        self.field(8);
        self.buf.put_i64(v.timestamp_micros() - PG_EPOCH_MICROS);
    }

    /// Nullable `timestamptz`.
    pub fn ts_opt(&mut self, v: Option<DateTime<Utc>>) {
        match v {
            Some(v) => self.ts(v),
            None => self.null(),
        }
    }

    /// `uuid`.
    pub fn uuid(&mut self, v: &Uuid) {
        self.field(16);
        self.buf.put_slice(v.as_bytes());
    }

    /// `text` (the caller has refused strings holding NUL, which PostgreSQL rejects).
    pub fn text(&mut self, v: &str) {
        self.field(len_i32(v.len()));
        self.buf.put_slice(v.as_bytes());
    }

    /// Nullable `text`.
    pub fn text_opt(&mut self, v: Option<&str>) {
        match v {
            Some(v) => self.text(v),
            None => self.null(),
        }
    }

    /// `jsonb`: version byte 1, then the JSON text, written straight into the buffer.
    pub fn jsonb(&mut self, v: &impl Jsonb) {
        let at = self.buf.len();
        self.field(0); // length, patched below
        self.buf.put_u8(1);
        // Neither kind can fail writing into memory (no I/O; a map has string keys only).
        if v.put_json(&mut self.buf).is_err() {
            self.buf.truncate(at);
            self.buf.put_i32(3);
            self.buf.put_slice(b"\x01{}");
            return;
        }
        let len = len_i32(self.buf.len() - at - 4);
        self.buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Nullable `inet`; an unparsable address is stored as NULL (the collector validated it,
    /// so this only guards against a foreign producer).
    pub fn inet_opt(&mut self, v: Option<&str>) {
        match v.and_then(|s| s.parse::<IpAddr>().ok()) {
            Some(IpAddr::V4(a)) => {
                self.field(8);
                self.buf.put_slice(&[2, 32, 0, 4]); // PGSQL_AF_INET, bits, is_cidr, length
                self.buf.put_slice(&a.octets());
            }
            Some(IpAddr::V6(a)) => {
                self.field(20);
                self.buf.put_slice(&[3, 128, 0, 16]); // PGSQL_AF_INET6
                self.buf.put_slice(&a.octets());
            }
            None => self.null(),
        }
    }

    /// Ends the stream: the chunks to send, trailer included.
    pub fn finish(mut self) -> Vec<Bytes> {
        self.check_row_complete();
        self.buf.put_i16(-1);
        self.done.push(self.buf.freeze());
        self.done
    }
}

/// Field lengths are i32 on the wire; message limits (32 KB per message, bounded batches)
/// keep every field far below 2 GB, so saturating is only a guard.
fn len_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Runs `COPY {target} FROM STDIN (FORMAT binary)` with the encoded chunks; returns the rows
/// the server took.
pub async fn send(
    tx: &Transaction<'_>,
    statement: &str,
    chunks: Vec<Bytes>,
) -> Result<u64, tokio_postgres::Error> {
    let sink = tx.copy_in::<_, Bytes>(statement).await?;
    futures::pin_mut!(sink);
    for chunk in chunks {
        sink.feed(chunk).await?;
    }
    sink.finish().await
}

/// Sends an encoder's stream with the statement it was built for; returns the rows the server
/// took.
pub(crate) async fn copy_in(
    tx: &Transaction<'_>,
    enc: CopyEncoder,
) -> Result<u64, tokio_postgres::Error> {
    let statement = enc.statement;
    send(tx, statement, enc.finish()).await
}

/// `COPY event ...` of the writer (column order of [`encode_event`]).
pub const COPY_EVENT: &str = "COPY event (tenant_id, occurred_at, event_id, workspace_id, type, \
    name, anonymous_id, user_id, session_id, message_id, received_at, sent_at, \
    original_timestamp, properties, context, ip, user_agent, bot) FROM STDIN (FORMAT binary)";

/// The same COPY into another table of `event`'s columns (a leaf, for the benchmark).
pub fn copy_event_into(table: &str) -> String {
    COPY_EVENT.replacen("COPY event ", &format!("COPY {table} "), 1)
}

/// Encodes events into binary COPY chunks of about [`CHUNK_BYTES`].
pub fn encode_events<'a, J: Jsonb + 'a>(
    events: impl IntoIterator<Item = &'a EventMessage<J>>,
) -> Vec<Bytes> {
    let mut enc = CopyEncoder::new(COPY_EVENT);
    for e in events {
        encode_event(&mut enc, e);
    }
    enc.finish()
}

/// Appends one event row (column order of [`COPY_EVENT`]).
pub(crate) fn encode_event(enc: &mut CopyEncoder, e: &EventMessage<impl Jsonb>) {
    enc.row();
    enc.i64(e.tenant_id);
    enc.ts(e.occurred_at);
    enc.uuid(&e.event_id);
    enc.i64(e.workspace_id);
    enc.text(e.kind.as_str());
    enc.text_opt(e.name.as_deref());
    enc.text_opt(e.anonymous_id.as_deref());
    enc.text_opt(e.user_id.as_deref());
    enc.text_opt(e.session_id.as_deref());
    enc.text(&e.message_id);
    enc.ts(e.received_at);
    enc.ts_opt(e.sent_at);
    enc.ts_opt(e.timestamp);
    enc.jsonb(&e.properties);
    enc.jsonb(&e.context);
    enc.inet_opt(e.ip.as_deref());
    enc.text_opt(e.user_agent.as_deref());
    enc.bool(e.bot);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn header_row_and_trailer_follow_the_format() {
        let mut e = CopyEncoder::new("COPY t (a, b) FROM STDIN (FORMAT binary)");
        e.row();
        e.i64(7);
        e.null();
        let out: Vec<u8> = e.finish().concat();
        assert_eq!(&out[..11], b"PGCOPY\n\xff\r\n\0");
        assert_eq!(&out[19..21], &2i16.to_be_bytes());
        assert_eq!(&out[21..25], &8i32.to_be_bytes());
        assert_eq!(&out[25..33], &7i64.to_be_bytes());
        assert_eq!(&out[33..37], &(-1i32).to_be_bytes());
        assert_eq!(&out[37..], &(-1i16).to_be_bytes());
    }

    #[test]
    fn jsonb_length_covers_version_byte_and_text() {
        let mut e = CopyEncoder::new("COPY t (a) FROM STDIN (FORMAT binary)");
        e.row();
        let mut m = JsonObject::new();
        m.insert("a".into(), Value::from(1));
        e.jsonb(&m);
        let out: Vec<u8> = e.finish().concat();
        let len = i32::from_be_bytes([out[21], out[22], out[23], out[24]]);
        assert_eq!(len as usize, 1 + br#"{"a":1}"#.len());
        assert_eq!(out[25], 1);
        assert_eq!(&out[26..33], br#"{"a":1}"#);
    }

    #[test]
    fn large_streams_are_cut_into_chunks() {
        let mut e = CopyEncoder::new("COPY t (a) FROM STDIN (FORMAT binary)");
        let big = "x".repeat(64 * 1024);
        for _ in 0..100 {
            e.row();
            e.text(&big);
        }
        let chunks = e.finish();
        assert!(chunks.len() >= 2, "{} chunks", chunks.len());
        assert!(chunks.iter().all(|c| c.len() <= CHUNK_BYTES + 70 * 1024));
    }

    #[test]
    fn column_counts_come_from_the_statements_column_list() {
        assert_eq!(columns_of(COPY_EVENT), 18);
        assert_eq!(columns_of("COPY t (a) FROM STDIN"), 1);
        assert_eq!(columns_of("COPY t FROM STDIN"), 0);
        assert_eq!(columns_of(&copy_event_into("event_y2026m01")), 18);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "a COPY row got 1 fields for 2 columns")]
    fn a_short_row_is_caught_in_debug_builds() {
        let mut e = CopyEncoder::new("COPY t (a, b) FROM STDIN (FORMAT binary)");
        e.row();
        e.i64(1);
        e.row();
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "COPY field 2 outside a row of 1 columns")]
    fn an_extra_field_is_caught_in_debug_builds() {
        let mut e = CopyEncoder::new("COPY t (a) FROM STDIN (FORMAT binary)");
        e.row();
        e.i64(1);
        e.null();
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "a COPY row got 0 fields for 1 columns")]
    fn an_unfinished_last_row_is_caught_in_debug_builds() {
        let mut e = CopyEncoder::new("COPY t (a) FROM STDIN (FORMAT binary)");
        e.row();
        let _ = e.finish();
    }
}
