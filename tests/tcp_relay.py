"""A TCP relay: `python tcp_relay.py PORT TARGET_PORT` listens on 127.0.0.1:PORT and forwards every
connection to 127.0.0.1:TARGET_PORT. The object-store tests put it in front of the S3 server and
kill it to make the store unreachable, as a restarting store is, while the server behind it keeps
its objects (moto keeps them in memory only, so the server itself cannot be restarted)."""

import asyncio
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def _main(port: int, target: int) -> None:
    async def relay(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))

    server = await asyncio.start_server(relay, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1]), int(sys.argv[2])))
