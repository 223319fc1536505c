//! Change encoding: how captured row changes are stored in the change log and framed for the
//! wire.
//!
//! Values travel as their PostgreSQL text form, which every type has and which survives
//! differences in column order and binary layout between nodes. A transaction's changes are
//! stored as postcard-encoded chunks; a batch on the wire is a postcard payload framed by a
//! magic, a length and a crc32, and it is decoded with bounds so that a corrupt or hostile batch
//! is refused whole before anything of it is applied.
//!
//! Plain Rust, no PostgreSQL: the test harness (pgrx-tests) compiles this very file to forge
//! batches the way a hostile peer would.

use serde::{Deserialize, Serialize};

/// What happened to a row.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
    /// A schema change (src/schema/ddl.rs): `new` holds `[command text, search_path, role]` and, when
    /// known, the shape of the tables it touched on its origin (a fourth value); `old` is `None`, and
    /// `rel` points to a description of the schema with no columns.
    Ddl,
}

/// A table as the capturing node saw it: peers resolve it by name, not by oid. `S` is the
/// string type: `String` (a [`RelDesc`]), or `&str` borrowed from the encoded chunk (a
/// [`ChunkView`]'s, for readers that only look).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelDescOf<S> {
    pub schema: S,
    pub name: S,
    /// Column names in the order of the values of every change of this table.
    pub columns: Vec<S>,
    /// Positions (into `columns`) of the replica key: the primary key or a unique index on
    /// NOT NULL columns.
    pub key: Vec<u16>,
}

pub type RelDesc = RelDescOf<String>;

/// One column value in text form; `None` is SQL NULL.
pub type Value = Option<String>;

/// One captured row change. `old` is the row before an update or delete, `new` the row after
/// an insert or update; both are full rows so peers can detect conflicts.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RowChangeOf<S> {
    /// Position of this change within its transaction; chunks are merged by it.
    pub ordinal: u32,
    /// Index into the chunk's `relations`.
    pub rel: u32,
    pub op: Op,
    pub old: Option<Vec<Option<S>>>,
    pub new: Option<Vec<Option<S>>>,
}

pub type RowChange = RowChangeOf<String>;

/// The changes of (part of) one transaction, as stored in one change log row.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkOf<S> {
    pub relations: Vec<RelDescOf<S>>,
    pub changes: Vec<RowChangeOf<S>>,
}

pub type Chunk = ChunkOf<String>;

/// A chunk read in place: its names and values borrow the encoded bytes. Reading row clocks
/// out of a trimmed change log looks at every value and keeps only keys; copying each into
/// its own `String` first cost more than the rest of the reading.
pub type ChunkView<'a> = ChunkOf<&'a str>;

/// A position in a node's outgoing stream: the tick whose snapshot first saw the transaction
/// committed, then the sequence number of the transaction's last chunk. Totally ordered, and
/// the same for every reader of that node.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub tick: i64,
    pub seq: i64,
}

/// The seq of the position "all of tick t": `(t, WHOLE_TICK)` comes after every transaction of
/// tick t and before those of t + 1. SQL text spells it `rbucardo.whole_tick()`.
pub const WHOLE_TICK: i64 = i64::MAX;

impl Position {
    /// The start of every stream: nothing of it seen yet (all of tick 0, which holds nothing).
    pub const START: Position = Position { tick: 0, seq: WHOLE_TICK };

    /// All of tick `tick`.
    pub fn whole(tick: i64) -> Position {
        Position { tick, seq: WHOLE_TICK }
    }

    /// The last tick this position covers completely.
    pub fn complete_tick(self) -> i64 {
        if self.seq == WHOLE_TICK { self.tick } else { self.tick - 1 }
    }
}

/// A part of a transaction that travels in several batches: its log chunks `start..end` (in
/// the sender's numbering, before chunks of unshared tables are left out), and whether more
/// follow. A batch holding a part holds nothing else.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub start: u32,
    pub end: u32,
    pub more: bool,
}

/// One committed transaction as shipped between nodes.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Txn {
    /// Node that made the change, kept through forwarding so nobody re-applies or echoes it.
    pub origin: i32,
    /// Position in the origin's own stream; the receiver's per-origin progress compares it.
    pub origin_pos: Position,
    /// Hybrid logical clock of the origin transaction.
    pub hlc: i64,
    /// Position in the sending node's stream; the receiver's cursor for the sender.
    pub stream_pos: Position,
    /// postcard-encoded `Chunk`s in capture order.
    pub chunks: Vec<Vec<u8>>,
    /// Set when the transaction is too large for one batch and travels in parts: which of its
    /// chunks this part carries. The receiver keeps parts until the last one and applies the
    /// transaction whole.
    pub part: Option<Part>,
    /// Set for a transaction addressed to one node (a repair, src/api/diff.rs): only that
    /// node applies it, and it forwards it to nobody.
    pub to: Option<i32>,
    /// The same chunks decoded, filled by [`decode_batch`] (which decodes every chunk to check
    /// it anyway) so that the applier does not decode them again. Not sent.
    #[serde(skip)]
    pub decoded: Decoded,
}

impl Txn {
    /// The transaction's chunks decoded: those `decode_batch` kept, else decoded now.
    pub fn decoded_chunks(&self) -> Result<std::borrow::Cow<'_, [Chunk]>, DecodeError> {
        if self.decoded.0.len() == self.chunks.len() {
            return Ok(std::borrow::Cow::Borrowed(&self.decoded.0));
        }
        self.chunks.iter().map(|c| decode_chunk(c)).collect::<Result<Vec<_>, _>>().map(std::borrow::Cow::Owned)
    }
}

/// Decoded chunks kept next to their bytes: a cache, not part of a transaction's value (two
/// transactions with the same bytes are equal whether or not they were decoded).
#[derive(Debug, Clone, Default)]
pub struct Decoded(pub Vec<Chunk>);

impl PartialEq for Decoded {
    fn eq(&self, _: &Decoded) -> bool {
        true
    }
}

impl Eq for Decoded {}

/// A batch of transactions from one node's stream.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Node id of the sender.
    pub sender: i32,
    /// The stream position the batch starts after.
    pub after: Position,
    /// The stream position the receiver may record once it has applied the batch, even when
    /// it holds no transaction for it (everything up to here was filtered out for it).
    pub upto: Position,
    pub txns: Vec<Txn>,
    /// The sender read its stream up to its newest tick: asking again at once would bring
    /// nothing.
    pub complete: bool,
}

impl Batch {
    /// The batch as consecutive batches of about `bytes` of chunks each (one transaction at
    /// least), to be applied in transactions of their own: each ends where its last
    /// transaction is in the stream, the last where the whole batch ends, and only that one
    /// says whether the sender's stream is complete. A batch carrying a part stays whole.
    pub fn slices(self, bytes: usize) -> Vec<Batch> {
        if self.txns.iter().any(|t| t.part.is_some()) {
            return vec![self];
        }
        let Batch { sender, mut after, upto, txns, complete } = self;
        let mut out = Vec::new();
        let (mut slice, mut size) = (Vec::new(), 0);
        for t in txns {
            let len: usize = t.chunks.iter().map(Vec::len).sum();
            if let Some(last) = slice.last().filter(|_| size + len > bytes).map(|t: &Txn| t.stream_pos) {
                out.push(Batch { sender, after, upto: last, txns: std::mem::take(&mut slice), complete: false });
                (after, size) = (last, 0);
            }
            size += len;
            slice.push(t);
        }
        out.push(Batch { sender, after, upto, txns: slice, complete });
        out
    }
}

const MAGIC: &[u8; 4] = b"RBC3";
const HEADER_LEN: usize = 12;

/// Why a batch was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    TooShort,
    BadMagic,
    TooLarge { len: usize, limit: usize },
    LengthMismatch { declared: usize, actual: usize },
    Checksum { declared: u32, actual: u32 },
    Malformed(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::TooShort => write!(f, "batch shorter than its header"),
            DecodeError::BadMagic => write!(f, "batch does not start with the rbucardo magic"),
            DecodeError::TooLarge { len, limit } => {
                write!(f, "batch of {len} bytes exceeds the limit of {limit} bytes")
            }
            DecodeError::LengthMismatch { declared, actual } => {
                write!(f, "batch declares {declared} payload bytes but carries {actual}")
            }
            DecodeError::Checksum { declared, actual } => {
                write!(f, "batch checksum mismatch (declared {declared:08x}, computed {actual:08x})")
            }
            DecodeError::Malformed(e) => write!(f, "batch payload is malformed: {e}"),
        }
    }
}

/// Frames a batch: magic, payload length (u32 LE), crc32 of the payload (u32 LE), payload.
pub fn encode_batch(batch: &Batch) -> Vec<u8> {
    let payload = postcard::to_allocvec(batch).expect("encoding a batch cannot fail");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Checks and decodes a framed batch; any inconsistency refuses the whole batch.
pub fn decode_batch(bytes: &[u8], limit: usize) -> Result<Batch, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::TooLarge { len: bytes.len(), limit });
    }
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::TooShort);
    }
    if &bytes[..4] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let declared = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    let payload = &bytes[HEADER_LEN..];
    if declared != payload.len() {
        return Err(DecodeError::LengthMismatch { declared, actual: payload.len() });
    }
    let actual = crc32fast::hash(payload);
    if actual != crc {
        return Err(DecodeError::Checksum { declared: crc, actual });
    }
    let mut batch: Batch = postcard::from_bytes(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    for txn in &mut batch.txns {
        txn.decoded = Decoded(txn.chunks.iter().map(|c| decode_chunk(c)).collect::<Result<_, _>>()?);
    }
    Ok(batch)
}

/// Encodes one chunk for the change log.
pub fn encode_chunk(chunk: &Chunk) -> Vec<u8> {
    postcard::to_allocvec(chunk).expect("encoding a chunk cannot fail")
}

/// A chunk made of borrowed parts, encoded to the same bytes as the `Chunk` it stands for:
/// capture encodes its buffer at commit without copying every row image and table first.
#[derive(Serialize)]
pub struct ChunkRef<'a> {
    pub relations: Vec<&'a RelDesc>,
    pub changes: Vec<&'a RowChange>,
}

/// Encodes a borrowed chunk into a buffer of `capacity` bytes to start with.
pub fn encode_chunk_ref(chunk: &ChunkRef, capacity: usize) -> Vec<u8> {
    postcard::to_extend(chunk, Vec::with_capacity(capacity)).expect("encoding a chunk cannot fail")
}

/// Decodes one chunk and checks that every change refers to a described table and carries
/// as many values as that table has columns.
pub fn decode_chunk(bytes: &[u8]) -> Result<Chunk, DecodeError> {
    decode_checked(bytes)
}

/// Decodes one chunk without copying its strings, with the checks of [`decode_chunk`].
pub fn view_chunk(bytes: &[u8]) -> Result<ChunkView<'_>, DecodeError> {
    decode_checked(bytes)
}

fn decode_checked<'a, S: Deserialize<'a> + std::fmt::Display>(bytes: &'a [u8]) -> Result<ChunkOf<S>, DecodeError> {
    let chunk: ChunkOf<S> = postcard::from_bytes(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    for rel in &chunk.relations {
        if rel.key.iter().any(|&k| k as usize >= rel.columns.len()) {
            return Err(DecodeError::Malformed(format!("key column out of range in {}.{}", rel.schema, rel.name)));
        }
    }
    for ch in &chunk.changes {
        let rel = chunk
            .relations
            .get(ch.rel as usize)
            .ok_or_else(|| DecodeError::Malformed(format!("change refers to table #{} of {}", ch.rel, chunk.relations.len())))?;
        if ch.op == Op::Ddl {
            let well_formed = rel.columns.is_empty()
                && rel.key.is_empty()
                && ch.old.is_none()
                && ch.new.as_ref().is_some_and(|n| (n.len() == 3 || n.len() == 4) && n.iter().all(|v| v.is_some()));
            if !well_formed {
                return Err(DecodeError::Malformed(format!("DDL change {} in schema {} is malformed", ch.ordinal, rel.schema)));
            }
            continue;
        }
        let width_ok = |row: &Option<Vec<Option<S>>>| row.as_ref().is_none_or(|r| r.len() == rel.columns.len());
        let images_ok = match ch.op {
            Op::Insert => ch.new.is_some(),
            Op::Update => ch.new.is_some() && ch.old.is_some(),
            Op::Delete => ch.old.is_some(),
            Op::Truncate => true,
            Op::Ddl => unreachable!(),
        };
        if !width_ok(&ch.old) || !width_ok(&ch.new) || !images_ok {
            return Err(DecodeError::Malformed(format!("change {} on {}.{} has wrong row images", ch.ordinal, rel.schema, rel.name)));
        }
    }
    Ok(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Batch {
        let chunk = Chunk {
            relations: vec![RelDesc { schema: "public".into(), name: "t".into(), columns: vec!["id".into(), "v".into()], key: vec![0] }],
            changes: vec![
                RowChange { ordinal: 1, rel: 0, op: Op::Insert, old: None, new: Some(vec![Some("1".into()), None]) },
                RowChange { ordinal: 2, rel: 0, op: Op::Delete, old: Some(vec![Some("1".into()), None]), new: None },
            ],
        };
        Batch {
            sender: 2,
            after: Position { tick: 1, seq: 5 },
            upto: Position { tick: 2, seq: 9 },
            txns: vec![Txn { origin: 2, origin_pos: Position { tick: 2, seq: 9 }, hlc: 42, stream_pos: Position { tick: 2, seq: 9 }, chunks: vec![encode_chunk(&chunk)], part: None, to: None, decoded: Decoded::default() }],
            complete: true,
        }
    }

    /// Capture writes what `ChunkRef` encodes; every reader decodes it as a `Chunk`.
    #[test]
    fn a_borrowed_chunk_encodes_as_the_owned_one() {
        let batch = sample();
        let chunk = decode_chunk(&batch.txns[0].chunks[0]).unwrap();
        let borrowed = ChunkRef { relations: chunk.relations.iter().collect(), changes: chunk.changes.iter().collect() };
        assert_eq!(encode_chunk_ref(&borrowed, 0), encode_chunk(&chunk));
        assert_eq!(encode_chunk_ref(&ChunkRef { relations: vec![], changes: vec![] }, 4), encode_chunk(&Chunk::default()));
    }

    /// A view reads what the owned decoding reads, and refuses what it refuses.
    #[test]
    fn a_view_reads_the_chunk_the_owned_decoding_reads() {
        let chunk = Chunk {
            relations: vec![RelDesc { schema: "s\u{e9}".into(), name: "t \"q\"".into(), columns: vec!["id".into(), "v".into()], key: vec![0] }],
            changes: vec![RowChange { ordinal: 3, rel: 0, op: Op::Update, old: Some(vec![Some("1".into()), None]), new: Some(vec![Some("1".into()), Some("\u{1F600}\n".into())]) }],
        };
        let bytes = encode_chunk(&chunk);
        let view = view_chunk(&bytes).unwrap();
        let owned = |v: &Option<Vec<Option<&str>>>| v.as_ref().map(|r| r.iter().map(|x| x.map(str::to_string)).collect::<Vec<Value>>());
        let r = &view.relations[0];
        let back = Chunk {
            relations: vec![RelDesc { schema: r.schema.into(), name: r.name.into(), columns: r.columns.iter().map(|c| c.to_string()).collect(), key: r.key.clone() }],
            changes: view.changes.iter().map(|c| RowChange { ordinal: c.ordinal, rel: c.rel, op: c.op, old: owned(&c.old), new: owned(&c.new) }).collect(),
        };
        assert_eq!(back, chunk);
        let mut bad = chunk.clone();
        bad.changes[0].new = Some(vec![None]);
        assert!(view_chunk(&encode_chunk(&bad)).is_err() && decode_chunk(&encode_chunk(&bad)).is_err());
        bad.changes[0].rel = 1;
        assert!(view_chunk(&encode_chunk(&bad)).is_err());
        assert!(view_chunk(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn ddl_changes_are_checked() {
        let ddl = |new: Option<Vec<Value>>, columns: Vec<String>| {
            let chunk = Chunk {
                relations: vec![RelDesc { schema: "public".into(), name: "CREATE TABLE".into(), columns, key: vec![] }],
                changes: vec![RowChange { ordinal: 1, rel: 0, op: Op::Ddl, old: None, new }],
            };
            decode_chunk(&encode_chunk(&chunk))
        };
        let good = Some(vec![Some("CREATE TABLE t (id int)".into()), Some("public".into()), Some("odoo".into())]);
        assert!(ddl(good.clone(), vec![]).is_ok());
        assert!(ddl(None, vec![]).is_err());
        assert!(ddl(Some(vec![Some("x".into())]), vec![]).is_err());
        assert!(ddl(Some(vec![None, Some("public".into()), Some("odoo".into())]), vec![]).is_err());
        assert!(ddl(Some(vec![Some("x".into()), Some("public".into())]), vec![]).is_err());
        assert!(ddl(good, vec!["id".into()]).is_err());
    }

    /// A pulled batch applied in slices: each starts where the one before ends, covers its
    /// transactions in order, and only the last ends where the batch did, complete or not.
    #[test]
    fn slices_follow_on_and_end_where_the_batch_ends() {
        let one = sample().txns.remove(0);
        let len = one.chunks[0].len();
        let txn = |seq| Txn { stream_pos: Position { tick: 2, seq }, ..one.clone() };
        let batch = Batch { txns: (10..15).map(txn).collect(), upto: Position { tick: 3, seq: WHOLE_TICK }, ..sample() };
        let slices = batch.clone().slices(2 * len);
        assert_eq!(slices.iter().map(|s| s.txns.len()).collect::<Vec<_>>(), vec![2, 2, 1]);
        assert_eq!(slices[0].after, batch.after);
        assert_eq!((slices[0].upto, slices[1].after), (Position { tick: 2, seq: 11 }, Position { tick: 2, seq: 11 }));
        assert_eq!((slices[1].upto, slices[2].after), (Position { tick: 2, seq: 13 }, Position { tick: 2, seq: 13 }));
        assert_eq!((slices[2].upto, slices.iter().map(|s| s.complete).collect::<Vec<_>>()), (batch.upto, vec![false, false, true]));
        assert_eq!(slices.iter().flat_map(|s| s.txns.clone()).collect::<Vec<_>>(), batch.txns);
        // One transaction larger than a slice is a slice of its own; an empty batch stays one.
        assert_eq!(batch.clone().slices(1).len(), 5);
        let empty = Batch { txns: vec![], ..batch.clone() };
        assert_eq!(empty.clone().slices(1), vec![empty]);
        // A part is never split off from its batch's end.
        let mut parted = batch.clone();
        parted.txns.truncate(1);
        parted.txns[0].part = Some(Part { start: 0, end: 1, more: true });
        assert_eq!(parted.clone().slices(1), vec![parted]);
    }

    #[test]
    fn round_trip() {
        let b = sample();
        assert_eq!(decode_batch(&encode_batch(&b), 1 << 20), Ok(b));
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let bytes = encode_batch(&sample());
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(decode_batch(&bad, 1 << 20).is_err(), "flipped byte {i} accepted");
        }
    }

    #[test]
    fn truncated_and_oversized_are_refused() {
        let bytes = encode_batch(&sample());
        assert!(matches!(decode_batch(&bytes[..bytes.len() - 1], 1 << 20), Err(DecodeError::LengthMismatch { .. })));
        assert!(matches!(decode_batch(&bytes[..3], 1 << 20), Err(DecodeError::TooShort)));
        assert!(matches!(decode_batch(&bytes, 10), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn inconsistent_chunk_is_refused_even_with_a_good_checksum() {
        let mut b = sample();
        let mut chunk = decode_chunk(&b.txns[0].chunks[0]).unwrap();
        chunk.changes[0].rel = 7;
        b.txns[0].chunks[0] = encode_chunk(&chunk);
        assert!(matches!(decode_batch(&encode_batch(&b), 1 << 20), Err(DecodeError::Malformed(_))));
        chunk.changes[0].rel = 0;
        chunk.changes[0].new = Some(vec![None]);
        b.txns[0].chunks[0] = encode_chunk(&chunk);
        assert!(matches!(decode_batch(&encode_batch(&b), 1 << 20), Err(DecodeError::Malformed(_))));
    }
}
