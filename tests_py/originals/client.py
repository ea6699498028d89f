# The original demo client, as it was, except that host and port come from the command line
# (the original hard-coded "192.168.1.3" and 1010).
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])

s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.connect((host, port))
s.send("Hello World".encode())
print(s.recv(1024).decode())
