//! Checked big-endian reads over the bytes of one pgoutput message: every
//! read names its field and fails with a [`DecodeError`] instead of panicking
//! (the decoding half of ARCHITECTURE.md invariant 6).

use bytes::{Buf, Bytes};

use super::DecodeError;
use super::messages::{TupleData, TupleValue};

/// Name of the message a tag introduces, `None` for unknown tags.
pub(super) fn tag_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        _ => return None,
    })
}

/// Checked big-endian reads over the rest of one message.
pub(super) struct Reader {
    pub(super) buf: Bytes,
    pub(super) message: &'static str,
}

impl Reader {
    pub(super) fn end(&self, field: &'static str, needed: usize) -> DecodeError {
        DecodeError::UnexpectedEnd {
            message: self.message,
            field,
            needed,
            remaining: self.buf.len(),
        }
    }

    pub(super) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let array: [u8; N] = self
            .buf
            .get(..N)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| self.end(field, N))?;
        // In range: `get(..N)` succeeded.
        self.buf.advance(N);
        Ok(array)
    }

    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    pub(super) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    pub(super) fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    pub(super) fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.array(field).map(u64::from_be_bytes)
    }

    pub(super) fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    /// `len` bytes as a slice of the input (no copy).
    pub(super) fn bytes(&mut self, len: u32, field: &'static str) -> Result<Bytes, DecodeError> {
        match usize::try_from(len) {
            Ok(len) if len <= self.buf.len() => Ok(self.buf.split_to(len)),
            _ => Err(self.end(field, usize::try_from(len).unwrap_or(usize::MAX))),
        }
    }

    /// A NUL-terminated UTF-8 string.
    pub(super) fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let Some(nul) = self.buf.iter().position(|&b| b == 0) else {
            return Err(DecodeError::UnterminatedString {
                message: self.message,
                field,
            });
        };
        // `nul < len`: both the split and the advance over the NUL are in range.
        let raw = self.buf.split_to(nul);
        self.buf.advance(1);
        match std::str::from_utf8(&raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(source) => Err(DecodeError::InvalidUtf8 {
                message: self.message,
                field,
                source,
            }),
        }
    }

    /// A fixed marker byte.
    pub(super) fn marker(&mut self, expected: u8, name: &'static str) -> Result<(), DecodeError> {
        let found = self.u8(name)?;
        if found == expected {
            Ok(())
        } else {
            Err(DecodeError::UnexpectedTupleMarker {
                message: self.message,
                expected: name,
                found,
            })
        }
    }

    /// TupleData: Int16 column count, then per column a kind byte and, for `t` and `b`, an Int32
    /// length and that many bytes.
    pub(super) fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let count = usize::from(self.u16("tuple column count")?);
        // Every value takes at least one byte.
        let mut values = Vec::with_capacity(count.min(self.buf.len()));
        for column in 0..count {
            let value = match self.u8("tuple value kind")? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' => {
                    let len = self.u32("text value length")?;
                    TupleValue::Text(self.bytes(len, "text value")?)
                }
                b'b' => {
                    let len = self.u32("binary value length")?;
                    TupleValue::Binary(self.bytes(len, "binary value")?)
                }
                kind => {
                    return Err(DecodeError::UnknownTupleKind {
                        message: self.message,
                        column,
                        kind,
                    });
                }
            };
            values.push(value);
        }
        Ok(values)
    }

    /// The message must be consumed exactly.
    pub(super) fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                message: self.message,
                remaining: self.buf.len(),
            })
        }
    }
}
