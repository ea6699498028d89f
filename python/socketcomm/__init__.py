"""socketcomm: framed messages over TCP for Python, with a Rust/tokio networking core.

    import socketcomm

    with socketcomm.Server("127.0.0.1", 0) as server:
        for event in server:
            if isinstance(event, socketcomm.Message):
                event.reply(b"got " + event.data)

See the README for the command line (``socketcomm server``/``socketcomm client``) and
``docs/protocol.md`` for the wire format.
"""

from socketcomm._socketcomm import (
    ACK_REPLY,
    DEFAULT_HOST,
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_MAX_FRAME,
    DEFAULT_PORT,
    PROTOCOL_VERSION,
    Client,
    ClientTls,
    Connected,
    ConnectionClosedError,
    Disconnected,
    FileReceived,
    FileSent,
    FrameTooLargeError,
    Message,
    PeerIdentity,
    ProtocolError,
    Received,
    Server,
    ServerTls,
    SocketCommError,
    SubscriptionRequest,
    TlsError,
    TransferError,
    __version__,
)

Event = Connected | Message | FileReceived | Disconnected | SubscriptionRequest
"""What iterating over a `Server` yields (`SubscriptionRequest` only with
``screen_subscriptions=True``)."""

__all__ = [
    "ACK_REPLY",
    "DEFAULT_HOST",
    "DEFAULT_MAX_FILE_SIZE",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_PORT",
    "PROTOCOL_VERSION",
    "Client",
    "ClientTls",
    "Connected",
    "ConnectionClosedError",
    "Disconnected",
    "Event",
    "FileReceived",
    "FileSent",
    "FrameTooLargeError",
    "Message",
    "PeerIdentity",
    "ProtocolError",
    "Received",
    "Server",
    "ServerTls",
    "SocketCommError",
    "SubscriptionRequest",
    "TlsError",
    "TransferError",
    "__version__",
]
