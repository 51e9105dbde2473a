//! PostgreSQL binary `COPY` encoding, done by hand into large buffers.
//!
//! tokio-postgres' `BinaryCopyInWriter` sends a message every 4 KB and goes through the
//! generic `ToSql` machinery per value; encoding the tuples ourselves into multi-megabyte
//! chunks and handing them to `CopyInSink` saves both (figures in docs/writer.md).

use std::collections::HashSet;
use std::net::IpAddr;

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::SinkExt;
use sluice_schema::messages::{EventMessage, RawObject};
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

/// Builds one `COPY ... FROM STDIN (FORMAT binary)` stream.
pub(crate) struct CopyEncoder {
    /// The chunk being filled.
    buf: BytesMut,
    /// Chunks full and ready to send.
    done: Vec<Bytes>,
    /// Columns per tuple, written at the start of each row.
    columns: i16,
    /// Rows encoded so far.
    pub rows: u64,
}

impl CopyEncoder {
    /// Starts a stream of tuples of `columns` fields.
    pub fn new(columns: i16) -> CopyEncoder {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        buf.put_slice(b"PGCOPY\n\xff\r\n\0");
        buf.put_i32(0); // flags
        buf.put_i32(0); // header extension length
        CopyEncoder {
            buf,
            done: Vec::new(),
            columns,
            rows: 0,
        }
    }

    /// Starts a tuple; the caller then writes exactly `columns` fields.
    pub fn row(&mut self) {
        if self.buf.len() >= CHUNK_BYTES {
            self.done.push(self.buf.split().freeze());
        }
        self.buf.put_i16(self.columns);
        self.rows += 1;
    }

    /// A NULL field.
    pub fn null(&mut self) {
        self.buf.put_i32(-1);
    }

    /// `bigint`.
    pub fn i64(&mut self, v: i64) {
        self.buf.put_i32(8);
        self.buf.put_i64(v);
    }

    /// `boolean`.
    pub fn bool(&mut self, v: bool) {
        self.buf.put_i32(1);
        self.buf.put_u8(u8::from(v));
    }

    /// `timestamptz`.
    pub fn ts(&mut self, v: DateTime<Utc>) {
        self.buf.put_i32(8);
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
        self.buf.put_i32(16);
        self.buf.put_slice(v.as_bytes());
    }

    /// `text` (the caller has refused strings holding NUL, which PostgreSQL rejects).
    pub fn text(&mut self, v: &str) {
        self.buf.put_i32(len_i32(v.len()));
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
        self.buf.put_i32(0); // length, patched below
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
                self.buf.put_i32(8);
                self.buf.put_slice(&[2, 32, 0, 4]); // PGSQL_AF_INET, bits, is_cidr, length
                self.buf.put_slice(&a.octets());
            }
            Some(IpAddr::V6(a)) => {
                self.buf.put_i32(20);
                self.buf.put_slice(&[3, 128, 0, 16]); // PGSQL_AF_INET6
                self.buf.put_slice(&a.octets());
            }
            None => self.null(),
        }
    }

    /// Ends the stream: the chunks to send, trailer included.
    pub fn finish(mut self) -> Vec<Bytes> {
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

/// `COPY event ...` of the writer (column order of [`encode_event`]).
pub const COPY_EVENT: &str = "COPY event (tenant_id, occurred_at, event_id, workspace_id, type, \
    name, anonymous_id, user_id, session_id, message_id, received_at, sent_at, \
    original_timestamp, properties, context, ip, user_agent, bot) FROM STDIN (FORMAT binary)";

/// What storing a batch's events did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct EventsStored {
    /// Rows copied into `event`.
    pub stored: u64,
    /// Events dropped because their id was already claimed (client retry or redelivery).
    pub duplicates: u64,
}

/// Claims the events' ids in `event_dedup`, copies the newly claimed ones into `event` and
/// adds them, and only them, to their visitor's and session's counters. The caller has
/// removed duplicates inside the batch.
///
/// The claim is first a binary `COPY` into `event_dedup` under a savepoint: the usual case,
/// since client retries and redeliveries are rare, and about a quarter less of the
/// database's time than the `ON CONFLICT` statement (23.6 against 30.8 µs a row, measured). An id already claimed (an earlier delivery of the same
/// `messageId`, possibly with another skew-corrected `occurred_at`) makes the COPY fail on the
/// primary key; it is rolled back and the claim is made again by `INSERT ... SELECT FROM
/// unnest(...) ON CONFLICT DO NOTHING RETURNING`, whose absent ids are the duplicates.
pub(crate) async fn events(
    tx: &Transaction<'_>,
    events: &[&EventMessage<RawObject>],
) -> Result<EventsStored, tokio_postgres::Error> {
    if events.is_empty() {
        return Ok(EventsStored::default());
    }
    let mut enc = CopyEncoder::new(18);
    if claim_all(tx, events).await? {
        for e in events {
            encode_event(&mut enc, e);
        }
        let stored = send(tx, COPY_EVENT, enc.finish()).await?;
        crate::merge::count_claimed(tx, events).await?;
        return Ok(EventsStored {
            stored,
            duplicates: 0,
        });
    }
    let tenants: Vec<i64> = events.iter().map(|e| e.tenant_id).collect();
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let received: Vec<DateTime<Utc>> = events.iter().map(|e| e.received_at).collect();
    let claimed: HashSet<(i64, Uuid)> = tx
        .query(
            "INSERT INTO event_dedup (tenant_id, event_id, received_at) \
             SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::timestamptz[]) \
             ON CONFLICT DO NOTHING RETURNING tenant_id, event_id",
            &[&tenants, &ids, &received],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let fresh: Vec<&EventMessage<RawObject>> = events
        .iter()
        .filter(|e| claimed.contains(&(e.tenant_id, e.event_id)))
        .copied()
        .collect();
    for e in &fresh {
        encode_event(&mut enc, e);
    }
    let duplicates = events.len() as u64 - enc.rows;
    let stored = if enc.rows > 0 {
        send(tx, COPY_EVENT, enc.finish()).await?
    } else {
        0
    };
    crate::merge::count_claimed(tx, &fresh).await?;
    Ok(EventsStored { stored, duplicates })
}

/// Claims every event's id by COPY; false (and nothing claimed) when one was claimed before.
async fn claim_all(
    tx: &Transaction<'_>,
    events: &[&EventMessage<RawObject>],
) -> Result<bool, tokio_postgres::Error> {
    let mut enc = CopyEncoder::new(3);
    for e in events {
        enc.row();
        enc.i64(e.tenant_id);
        enc.uuid(&e.event_id);
        enc.ts(e.received_at);
    }
    tx.batch_execute("SAVEPOINT dedup_claim").await?;
    match send(tx, COPY_DEDUP, enc.finish()).await {
        Ok(_) => {
            tx.batch_execute("RELEASE SAVEPOINT dedup_claim").await?;
            Ok(true)
        }
        Err(err) if is_dedup_conflict(&err) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT dedup_claim; RELEASE SAVEPOINT dedup_claim")
                .await?;
            Ok(false)
        }
        Err(err) => Err(err),
    }
}

const COPY_DEDUP: &str =
    "COPY event_dedup (tenant_id, event_id, received_at) FROM STDIN (FORMAT binary)";

fn is_dedup_conflict(err: &tokio_postgres::Error) -> bool {
    err.as_db_error().is_some_and(|db| {
        *db.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            && db.table() == Some("event_dedup")
    })
}

/// The same COPY into another table of `event`'s columns (a leaf, for the benchmark).
pub fn copy_event_into(table: &str) -> String {
    COPY_EVENT.replacen("COPY event ", &format!("COPY {table} "), 1)
}

/// Encodes events into binary COPY chunks of about [`CHUNK_BYTES`].
pub fn encode_events<'a, J: Jsonb + 'a>(
    events: impl IntoIterator<Item = &'a EventMessage<J>>,
) -> Vec<Bytes> {
    let mut enc = CopyEncoder::new(18);
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
        let mut e = CopyEncoder::new(2);
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
        let mut e = CopyEncoder::new(1);
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
        let mut e = CopyEncoder::new(1);
        let big = "x".repeat(64 * 1024);
        for _ in 0..100 {
            e.row();
            e.text(&big);
        }
        let chunks = e.finish();
        assert!(chunks.len() >= 2, "{} chunks", chunks.len());
        assert!(chunks.iter().all(|c| c.len() <= CHUNK_BYTES + 70 * 1024));
    }
}
