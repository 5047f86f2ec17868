//! envd's messages in protobuf's binary form (`application/proto` and `application/connect+proto`), the default
//! codec of Connect clients other than E2B's SDKs (connect-go, connect-es, connectrpc's Python binary codec).
//!
//! The Rust types are those of [`super::messages`]; this module gives each request type a decoder and each answer
//! type an encoder, with the field numbers of E2B's `process/process.proto` and `filesystem/filesystem.proto`. The
//! wire primitives (keys, varints) are prost's. Decoding follows protobuf's rules: unknown fields are skipped, the
//! last of a repeated singular field wins, a field of the wrong wire type is an error; it never recurses deeper than
//! the schema does, and the message itself was bounded by the envelope limit before it got here. Encoding leaves out
//! fields at their default value, except members of a oneof and `optional` fields, whose presence is meaning.

use std::collections::BTreeMap;

use prost::encoding::{decode_key, decode_varint, encode_key, encode_varint, WireType};

use super::messages::{
    CreateWatcherResponse, DataEvent, Empty, EndEvent, EntryInfo, EntryResponse, EnumValue, FilesystemEvent,
    ListDirRequest, ListDirResponse, ListResponse, MoveRequest, PathRequest, ProcessConfig, ProcessEvent,
    ProcessEventMessage, ProcessInfo, ProcessInput, ProcessSelector, Pty, PtySize, SelectorRequest, SendInputRequest,
    SendSignalRequest, StartRequest, StreamInputData, StreamInputRequest, UpdateRequest, WatchDirResponse,
    WatchRequest, WatcherEventsResponse, WatcherRequest,
};

/// A message that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

impl From<prost::DecodeError> for DecodeError {
    fn from(error: prost::DecodeError) -> Self {
        Self(error.to_string())
    }
}

/// An answer message: writes its fields.
pub trait Encode {
    /// Writes the fields into `out`.
    fn encode(&self, out: &mut Writer);

    /// The encoded message.
    fn to_proto(&self) -> Vec<u8> {
        let mut out = Writer::default();
        self.encode(&mut out);
        out.bytes
    }
}

/// A request message: takes its fields one by one, starting from the default value.
pub trait Decode: Default {
    /// Takes field `number`; unknown numbers must be ignored.
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError>;
}

/// Decodes one message.
pub fn decode<T: Decode>(mut bytes: &[u8]) -> Result<T, DecodeError> {
    let mut message = T::default();
    while !bytes.is_empty() {
        let (number, wire_type) = decode_key(&mut bytes)?;
        let value = match wire_type {
            WireType::Varint => Value::Varint(decode_varint(&mut bytes)?),
            WireType::LengthDelimited => {
                let length = usize::try_from(decode_varint(&mut bytes)?).unwrap_or(usize::MAX);
                if length > bytes.len() {
                    return Err(DecodeError(format!("field {number} runs past the end of the message")));
                }
                let (value, rest) = bytes.split_at(length);
                bytes = rest;
                Value::Bytes(value)
            }
            WireType::ThirtyTwoBit | WireType::SixtyFourBit => {
                // No envd field is fixed-width: skip it as an unknown field.
                let width = if wire_type == WireType::ThirtyTwoBit { 4 } else { 8 };
                if width > bytes.len() {
                    return Err(DecodeError(format!("field {number} runs past the end of the message")));
                }
                bytes = &bytes[width..];
                continue;
            }
            WireType::StartGroup | WireType::EndGroup => {
                return Err(DecodeError(format!("field {number} is a group, which proto3 has not")))
            }
        };
        message.merge_field(number, value)?;
    }
    Ok(message)
}

/// The value of one field on the wire.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    /// A varint (integers, booleans, enums).
    Varint(u64),
    /// Length-delimited bytes (strings, bytes, messages, map entries).
    Bytes(&'a [u8]),
}

impl<'a> Value<'a> {
    fn varint(self) -> Result<u64, DecodeError> {
        match self {
            Self::Varint(value) => Ok(value),
            Self::Bytes(_) => Err(DecodeError("a length-delimited value where a number belongs".into())),
        }
    }

    fn delimited(self) -> Result<&'a [u8], DecodeError> {
        match self {
            Self::Bytes(bytes) => Ok(bytes),
            Self::Varint(_) => Err(DecodeError("a number where bytes, text or a message belong".into())),
        }
    }

    /// A `uint32` (truncated from 64 bits, as protobuf does).
    pub fn uint32(self) -> Result<u32, DecodeError> {
        Ok(self.varint()? as u32)
    }

    /// An `int32` or an enum number.
    pub fn int32(self) -> Result<i32, DecodeError> {
        Ok(self.varint()? as i32)
    }

    /// A `bool`.
    pub fn bool(self) -> Result<bool, DecodeError> {
        Ok(self.varint()? != 0)
    }

    /// `bytes`.
    pub fn bytes(self) -> Result<Vec<u8>, DecodeError> {
        Ok(self.delimited()?.to_vec())
    }

    /// A `string` (valid UTF-8).
    pub fn string(self) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes()?).map_err(|_| DecodeError("a string field is not UTF-8".into()))
    }

    /// A nested message.
    pub fn message<T: Decode>(self) -> Result<T, DecodeError> {
        decode(self.delimited()?)
    }
}

/// Builds an encoded message.
#[derive(Debug, Default)]
pub struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    fn varint(&mut self, number: u32, value: u64) {
        if value != 0 {
            encode_key(number, WireType::Varint, &mut self.bytes);
            encode_varint(value, &mut self.bytes);
        }
    }

    /// A `uint32`, left out when 0.
    pub fn uint32(&mut self, number: u32, value: u32) {
        self.varint(number, value.into());
    }

    /// An `int32` or enum number, left out when 0 (negative numbers take ten bytes, as protobuf's do).
    pub fn int32(&mut self, number: u32, value: i32) {
        self.varint(number, i64::from(value) as u64);
    }

    /// An `int64`, left out when 0.
    pub fn int64(&mut self, number: u32, value: i64) {
        self.varint(number, value as u64);
    }

    /// A `sint32` (zigzag), left out when 0.
    pub fn sint32(&mut self, number: u32, value: i32) {
        self.varint(number, u64::from(((value << 1) ^ (value >> 31)) as u32));
    }

    /// A `bool`, left out when false.
    pub fn bool(&mut self, number: u32, value: bool) {
        self.varint(number, value.into());
    }

    /// `bytes` or a `string`, left out when empty.
    pub fn bytes(&mut self, number: u32, value: impl AsRef<[u8]>) {
        let value = value.as_ref();
        if !value.is_empty() {
            self.present(number, value);
        }
    }

    /// Length-delimited bytes written even when empty: a oneof member, an `optional` field or a repeated element.
    pub fn present(&mut self, number: u32, value: impl AsRef<[u8]>) {
        let value = value.as_ref();
        encode_key(number, WireType::LengthDelimited, &mut self.bytes);
        encode_varint(value.len() as u64, &mut self.bytes);
        self.bytes.extend_from_slice(value);
    }

    /// A nested message written by `fields` (present even when it has none).
    pub fn nested(&mut self, number: u32, fields: impl FnOnce(&mut Writer)) {
        let mut inner = Writer::default();
        fields(&mut inner);
        self.present(number, &inner.bytes);
    }

    /// A nested message.
    pub fn message(&mut self, number: u32, message: &impl Encode) {
        self.nested(number, |out| message.encode(out));
    }

    /// A `map<string, string>`: one entry message (key 1, value 2) per pair.
    pub fn string_map(&mut self, number: u32, map: &BTreeMap<String, String>) {
        for (key, value) in map {
            self.nested(number, |entry| {
                entry.bytes(1, key);
                entry.bytes(2, value);
            });
        }
    }
}

/// One entry of a `map<string, string>` being decoded.
#[derive(Debug, Default)]
struct StringMapEntry {
    key: String,
    value: String,
}

impl Decode for StringMapEntry {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        match number {
            1 => self.key = value.string()?,
            2 => self.value = value.string()?,
            _ => {}
        }
        Ok(())
    }
}

// Requests (process.proto).

impl Decode for Empty {
    fn merge_field(&mut self, _: u32, _: Value<'_>) -> Result<(), DecodeError> {
        Ok(())
    }
}

impl Decode for ProcessSelector {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        // `oneof selector { uint32 pid = 1; string tag = 2; }`: the last one given wins.
        match number {
            1 => {
                *self = Self {
                    pid: Some(value.uint32()?),
                    tag: None,
                }
            }
            2 => {
                *self = Self {
                    pid: None,
                    tag: Some(value.string()?),
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl Decode for ProcessConfig {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        match number {
            1 => self.cmd = value.string()?,
            2 => self.args.push(value.string()?),
            3 => {
                let entry: StringMapEntry = value.message()?;
                self.envs.insert(entry.key, entry.value);
            }
            4 => self.cwd = Some(value.string()?),
            _ => {}
        }
        Ok(())
    }
}

impl Decode for PtySize {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        match number {
            1 => self.cols = value.uint32()?,
            2 => self.rows = value.uint32()?,
            _ => {}
        }
        Ok(())
    }
}

impl Decode for Pty {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        if number == 1 {
            self.size = Some(value.message()?);
        }
        Ok(())
    }
}

impl Decode for StartRequest {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        match number {
            1 => self.process = value.message()?,
            2 => self.pty = Some(value.message()?),
            3 => self.tag = Some(value.string()?),
            4 => self.stdin = Some(value.bool()?),
            _ => {}
        }
        Ok(())
    }
}

/// `ConnectRequest`, `CloseStdinRequest` and `StreamInputRequest.StartEvent`: the process is field 1.
impl Decode for SelectorRequest {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        if number == 1 {
            self.process = value.message()?;
        }
        Ok(())
    }
}

impl Decode for UpdateRequest {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        match number {
            1 => self.process = value.message()?,
            2 => self.pty = Some(value.message()?),
            _ => {}
        }
        Ok(())
    }
}

impl Decode for ProcessInput {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        // `oneof input { bytes stdin = 1; bytes pty = 2; }`
        match number {
            1 => {
                *self = Self {
                    stdin: Some(value.bytes()?),
                    pty: None,
                }
            }
            2 => {
                *self = Self {
                    stdin: None,
                    pty: Some(value.bytes()?),
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl Decode for SendInputRequest {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        match number {
            1 => self.process = value.message()?,
            2 => self.input = value.message()?,
            _ => {}
        }
        Ok(())
    }
}

impl Decode for SendSignalRequest {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        match number {
            1 => self.process = value.message()?,
            2 => self.signal = Some(EnumValue::Number(value.int32()?.into())),
            _ => {}
        }
        Ok(())
    }
}

impl Decode for StreamInputRequest {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        // `oneof event { StartEvent start = 1; DataEvent data = 2; KeepAlive keepalive = 3; }`
        match number {
            1 => {
                *self = Self {
                    start: Some(value.message()?),
                    data: None,
                }
            }
            2 => {
                *self = Self {
                    start: None,
                    data: Some(value.message()?),
                }
            }
            3 => *self = Self::default(),
            _ => {}
        }
        Ok(())
    }
}

impl Decode for StreamInputData {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        if number == 2 {
            self.input = value.message()?;
        }
        Ok(())
    }
}

// Requests (filesystem.proto).

/// `StatRequest`, `MakeDirRequest` and `RemoveRequest`: the path is field 1.
impl Decode for PathRequest {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        if number == 1 {
            self.path = value.string()?;
        }
        Ok(())
    }
}

impl Decode for ListDirRequest {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        match number {
            1 => self.path = value.string()?,
            2 => self.depth = value.uint32()?,
            _ => {}
        }
        Ok(())
    }
}

impl Decode for MoveRequest {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        match number {
            1 => self.source = value.string()?,
            2 => self.destination = value.string()?,
            _ => {}
        }
        Ok(())
    }
}

/// `WatchDirRequest` and `CreateWatcherRequest`, which share their fields.
impl Decode for WatchRequest {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        match number {
            1 => self.path = value.string()?,
            2 => self.recursive = value.bool()?,
            3 => self.include_entry = value.bool()?,
            4 => self.allow_network_mounts = value.bool()?,
            _ => {}
        }
        Ok(())
    }
}

/// `GetWatcherEventsRequest` and `RemoveWatcherRequest`.
impl Decode for WatcherRequest {
    fn merge_field(&mut self, number: u32, value: Value<'_>) -> Result<(), DecodeError> {
        if number == 1 {
            self.watcher_id = value.string()?;
        }
        Ok(())
    }
}

// Answers (process.proto).

impl Encode for Empty {
    fn encode(&self, _: &mut Writer) {}
}

/// `StartResponse` and `ConnectResponse`: the event is field 1.
impl Encode for ProcessEventMessage {
    fn encode(&self, out: &mut Writer) {
        out.message(1, &self.event);
    }
}

impl Encode for ProcessEvent {
    fn encode(&self, out: &mut Writer) {
        // `oneof event { StartEvent start = 1; DataEvent data = 2; EndEvent end = 3; KeepAlive keepalive = 4; }`
        match self {
            Self::Start { pid } => out.nested(1, |start| start.uint32(1, *pid)),
            Self::Data(data) => out.message(2, data),
            Self::End(end) => out.message(3, end),
            Self::Keepalive {} => out.nested(4, |_| {}),
        }
    }
}

impl Encode for DataEvent {
    fn encode(&self, out: &mut Writer) {
        // `oneof output { bytes stdout = 1; bytes stderr = 2; bytes pty = 3; }`
        match self {
            Self::Stdout(bytes) => out.present(1, bytes),
            Self::Stderr(bytes) => out.present(2, bytes),
            Self::Pty(bytes) => out.present(3, bytes),
        }
    }
}

impl Encode for EndEvent {
    fn encode(&self, out: &mut Writer) {
        out.sint32(1, self.exit_code);
        out.bool(2, self.exited);
        out.bytes(3, &self.status);
        if let Some(error) = &self.error {
            out.present(4, error);
        }
    }
}

impl Encode for ProcessConfig {
    fn encode(&self, out: &mut Writer) {
        out.bytes(1, &self.cmd);
        for arg in &self.args {
            out.present(2, arg);
        }
        out.string_map(3, &self.envs);
        if let Some(cwd) = &self.cwd {
            out.present(4, cwd);
        }
    }
}

impl Encode for ProcessInfo {
    fn encode(&self, out: &mut Writer) {
        out.message(1, &self.config);
        out.uint32(2, self.pid);
    }
}

impl Encode for ListResponse {
    fn encode(&self, out: &mut Writer) {
        for process in &self.processes {
            out.message(1, process);
        }
    }
}

// Answers (filesystem.proto).

impl Encode for EntryInfo {
    fn encode(&self, out: &mut Writer) {
        out.bytes(1, &self.name);
        out.int32(2, self.kind as i32);
        out.bytes(3, &self.path);
        out.int64(4, i64::try_from(self.size).unwrap_or(i64::MAX));
        out.uint32(5, self.mode);
        out.bytes(6, &self.permissions);
        out.bytes(7, &self.owner);
        out.bytes(8, &self.group);
        if let Some(at) = self.modified_time {
            // google.protobuf.Timestamp { int64 seconds = 1; int32 nanos = 2; }
            out.nested(9, |timestamp| {
                timestamp.int64(1, at.timestamp());
                timestamp.int32(2, at.timestamp_subsec_nanos() as i32);
            });
        }
        if let Some(target) = &self.symlink_target {
            out.present(10, target);
        }
        out.string_map(11, &self.metadata);
        out.bool(12, self.is_symlink);
    }
}

/// `StatResponse`, `MakeDirResponse` and `MoveResponse`: the entry is field 1.
impl Encode for EntryResponse {
    fn encode(&self, out: &mut Writer) {
        out.message(1, &self.entry);
    }
}

impl Encode for ListDirResponse {
    fn encode(&self, out: &mut Writer) {
        for entry in &self.entries {
            out.message(1, entry);
        }
    }
}

impl Encode for FilesystemEvent {
    fn encode(&self, out: &mut Writer) {
        out.bytes(1, &self.name);
        out.int32(2, self.kind as i32);
        if let Some(entry) = &self.entry {
            out.message(3, entry);
        }
    }
}

impl Encode for WatchDirResponse {
    fn encode(&self, out: &mut Writer) {
        // `oneof event { StartEvent start = 1; FilesystemEvent filesystem = 2; KeepAlive keepalive = 3; }`
        match self {
            Self::Start {} => out.nested(1, |_| {}),
            Self::Filesystem(event) => out.message(2, event.as_ref()),
            Self::Keepalive {} => out.nested(3, |_| {}),
        }
    }
}

impl Encode for CreateWatcherResponse {
    fn encode(&self, out: &mut Writer) {
        out.bytes(1, &self.watcher_id);
    }
}

impl Encode for WatcherEventsResponse {
    fn encode(&self, out: &mut Writer) {
        for event in &self.events {
            out.message(1, event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envd::messages::{EventType, FileType};

    #[test]
    fn process_events_encode_as_protoc_would() {
        let start = ProcessEventMessage {
            event: ProcessEvent::Start { pid: 7 },
        };
        // event (1) { start (1) { pid (1) = 7 } }
        assert_eq!(start.to_proto(), [0x0a, 0x04, 0x0a, 0x02, 0x08, 0x07]);
        let keepalive = ProcessEventMessage {
            event: ProcessEvent::Keepalive {},
        };
        // An empty oneof member is still there: event { keepalive (4) {} }.
        assert_eq!(keepalive.to_proto(), [0x0a, 0x02, 0x22, 0x00]);
        let empty_output = ProcessEventMessage {
            event: ProcessEvent::Data(DataEvent::Stderr(Vec::new())),
        };
        assert_eq!(empty_output.to_proto(), [0x0a, 0x04, 0x12, 0x02, 0x12, 0x00]);
        let killed = EndEvent {
            exit_code: -1,
            exited: false,
            status: "signal: killed".into(),
            error: Some(String::new()),
        };
        // sint32 -1 zigzags to 1; `exited` false is left out; the optional `error` is there though empty.
        let mut expected = vec![0x08, 0x01, 0x1a, 14];
        expected.extend_from_slice(b"signal: killed");
        expected.extend_from_slice(&[0x22, 0x00]);
        assert_eq!(killed.to_proto(), expected);
    }

    #[test]
    fn entries_encode_enums_timestamps_and_maps() {
        let entry = EntryInfo {
            name: "a".into(),
            kind: FileType::Directory,
            path: String::new(),
            size: 0,
            mode: 0o755,
            permissions: String::new(),
            owner: String::new(),
            group: String::new(),
            modified_time: chrono::DateTime::from_timestamp(1, 5),
            symlink_target: None,
            metadata: BTreeMap::from([("k".to_string(), "v".to_string())]),
            is_symlink: false,
        };
        let expected = [
            0x0a, 0x01, b'a', // name
            0x10, 0x02, // type = FILE_TYPE_DIRECTORY
            0x28, 0xed, 0x03, // mode = 493
            0x4a, 0x04, 0x08, 0x01, 0x10, 0x05, // modified_time { seconds = 1, nanos = 5 }
            0x5a, 0x06, 0x0a, 0x01, b'k', 0x12, 0x01, b'v', // metadata { key = "k", value = "v" }
        ];
        assert_eq!(entry.to_proto(), expected);
        let event = FilesystemEvent {
            name: "b".into(),
            kind: EventType::Chmod,
            entry: None,
        };
        assert_eq!(event.to_proto(), [0x0a, 0x01, b'b', 0x10, 0x05]);
    }

    #[test]
    fn requests_decode_with_unknown_fields_skipped() {
        let mut bytes = vec![
            0x0a, 0x13, // process {
            0x0a, 0x02, b's', b'h', // cmd
            0x12, 0x02, b'-', b'c', // args
            0x1a, 0x06, 0x0a, 0x01, b'A', 0x12, 0x01, b'1', // envs { A: 1 }
            0xf8, 0x06, 0x2a, // unknown field 111 (varint) }
            0x20, 0x00, // stdin = false (present)
            0x35, 1, 2, 3, 4, // unknown field 6 (fixed32)
        ];
        let start: StartRequest = decode(&bytes).unwrap();
        assert_eq!(start.process.cmd, "sh");
        assert_eq!(start.process.args, ["-c"]);
        assert_eq!(start.process.envs.get("A").map(String::as_str), Some("1"));
        assert_eq!(start.stdin, Some(false));
        assert!(start.pty.is_none() && start.tag.is_none());

        // Oneof members: the last one wins.
        let input: SendInputRequest = decode(&[0x0a, 0x02, 0x08, 0x09, 0x12, 0x03, 0x12, 0x01, b'x']).unwrap();
        assert_eq!(input.process.pid, Some(9));
        assert_eq!((input.input.stdin, input.input.pty), (None, Some(b"x".to_vec())));
        let selector: ProcessSelector = decode(&[0x08, 0x09, 0x12, 0x01, b't']).unwrap();
        assert_eq!((selector.pid, selector.tag.as_deref()), (None, Some("t")));

        // A length past the end, a number where text belongs, text that is not UTF-8, a group: refused.
        bytes.truncate(5);
        assert!(decode::<StartRequest>(&bytes).is_err());
        assert!(decode::<PathRequest>(&[0x08, 0x01]).is_err());
        assert!(decode::<PathRequest>(&[0x0a, 0x01, 0xff]).is_err());
        assert!(decode::<PathRequest>(&[0x0b]).is_err());
    }
}
