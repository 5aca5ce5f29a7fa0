from workers.cli import console

console()
