//! [`Message`]s over one QUIC stream pair: a reader that turns received bytes
//! into messages with [`FrameDecoder`] (so a peer's frame limit and list
//! bounds are enforced as the bytes arrive), and a writer that encodes.
//!
//! The reader refuses, as a [`LinkError::Protocol`], a message the peer's
//! side may not send (a cell sending `StartWork`, say): the caller then
//! closes the connection with [`corral_proto::wire::CloseCode::Protocol`].

use corral_proto::wire::{encode_into, FrameDecoder, Message, Sender, WireError};

/// Bytes read from the stream at a time.
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The bytes were not a valid frame or message.
    #[error("bad frame from the peer: {0}")]
    Wire(#[from] WireError),
    /// A message the peer's role may not send, or one out of order.
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("reading from the peer: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("writing to the peer: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("the connection is closed: {0}")]
    Closed(#[from] quinn::ConnectionError),
}

/// Reads messages sent by a peer of role `from`.
pub struct MessageReader {
    recv: quinn::RecvStream,
    dec: FrameDecoder,
    from: Sender,
    buf: Vec<u8>,
    pos: usize,
}

impl MessageReader {
    /// `from` is the role of the peer: [`Sender::Cell`] on the brain's side,
    /// [`Sender::Brain`] on the cell's.
    pub fn new(recv: quinn::RecvStream, from: Sender) -> Self {
        Self {
            recv,
            dec: FrameDecoder::new(),
            from,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// The next message, or `None` when the peer finished the stream
    /// cleanly between two frames. Cancel-safe: a message is never lost if
    /// the future is dropped.
    pub async fn next(&mut self) -> Result<Option<Message>, LinkError> {
        loop {
            if self.pos < self.buf.len() {
                let mut input = &self.buf[self.pos..];
                let msg = self.dec.decode(&mut input)?;
                self.pos = self.buf.len() - input.len();
                if let Some(msg) = msg {
                    self.check_sender(&msg)?;
                    return Ok(Some(msg));
                }
            }
            self.buf.clear();
            self.pos = 0;
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None => {
                    self.dec.finish()?;
                    return Ok(None);
                }
            }
        }
    }

    fn check_sender(&self, msg: &Message) -> Result<(), LinkError> {
        let sender = msg.sender();
        if sender == Sender::Either || sender == self.from {
            return Ok(());
        }
        Err(LinkError::Protocol(format!(
            "{} may not be sent by a {}",
            msg.name(),
            match self.from {
                Sender::Cell => "cell",
                Sender::Brain => "brain",
                Sender::Either => "peer",
            }
        )))
    }
}

/// Writes messages, reusing one buffer.
pub struct MessageWriter {
    send: quinn::SendStream,
    buf: Vec<u8>,
}

impl MessageWriter {
    pub fn new(send: quinn::SendStream) -> Self {
        Self {
            send,
            buf: Vec::new(),
        }
    }

    /// Encodes and sends one message. An oversized message is refused by
    /// the encoder before anything is written.
    pub async fn send(&mut self, msg: &Message) -> Result<(), LinkError> {
        self.buf.clear();
        encode_into(msg, &mut self.buf)?;
        self.send.write_all(&self.buf).await?;
        Ok(())
    }

    /// Finishes the stream: the peer's reader sees a clean end.
    pub fn finish(&mut self) {
        // Already finished or reset: nothing more to say.
        let _ = self.send.finish();
    }
}
