//! Build output arrives in chunks of any size from every builder (the
//! classic builder's stream, BuildKit's step logs, pack's pipes); users read
//! lines. One splitter for all of them, so every source gets the same
//! bounds.

/// A tool that redraws a progress bar without newlines must not make one
/// line of unbounded size.
pub const MAX_LINE: usize = 16 * 1024;

/// Splits a byte stream into lines (`\n` or `\r\n`), decoding each lossily:
/// build output is not always UTF-8. Only the new bytes of each chunk are
/// scanned, and a line longer than [`MAX_LINE`] is cut into pieces of that
/// size, so neither time nor memory grows with a line's length.
#[derive(Default)]
pub struct LineBuffer {
    partial: Vec<u8>,
}

impl LineBuffer {
    pub fn push(&mut self, mut data: &[u8], emit: &mut impl FnMut(String)) {
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&data[..pos]);
            data = &data[pos + 1..];
            emit(Self::decode(std::mem::take(&mut self.partial)));
        }
        self.partial.extend_from_slice(data);
        while self.partial.len() >= MAX_LINE {
            let rest = self.partial.split_off(MAX_LINE);
            emit(Self::decode(std::mem::replace(&mut self.partial, rest)));
        }
    }

    /// The last line, when the output did not end with a newline.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.partial);
        (!rest.is_empty()).then(|| Self::decode(rest))
    }

    fn decode(mut line: Vec<u8>) -> String {
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        String::from_utf8_lossy(&line).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut buffer = LineBuffer::default();
        let mut lines = Vec::new();
        for chunk in chunks {
            buffer.push(chunk, &mut |line| lines.push(line));
        }
        lines.extend(buffer.finish());
        lines
    }

    #[test]
    fn lines_are_reassembled_across_reads() {
        assert_eq!(
            split(&[b"===> DETEC", b"TING\r\nnpm i\n\nlast", b" words"]),
            ["===> DETECTING", "npm i", "", "last words"]
        );
        assert_eq!(
            split(&[b"Step 1/2 : FR", b"OM x\n ---> abc\r\npart", b"ial\n\n"]),
            ["Step 1/2 : FROM x", " ---> abc", "partial", ""]
        );
    }

    #[test]
    fn invalid_utf8_and_endless_lines_still_make_lines() {
        let long = vec![b'x'; MAX_LINE + 10];
        let lines = split(&[b"caf\xe9\n", &long]);
        assert_eq!(lines[0], "caf\u{fffd}");
        assert_eq!(lines[1].len(), MAX_LINE);
        assert_eq!(lines[2], "x".repeat(10));
    }
}
