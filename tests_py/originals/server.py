# The original demo server, as it was, except that host and port come from the command line
# (the original hard-coded "192.168.1.3" and 1010).
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])

s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(5)
print("listening", s.getsockname()[1], flush=True)

while True:
    c, addr = s.accept()
    print("connected to", addr, flush=True)
    msg = c.recv(1024).decode()
    print("message from client is", msg, flush=True)
    c.send("Your message has been received, Thank you!".encode())
    c.close()
    print("Comunication with", addr, "ended!", flush=True)
