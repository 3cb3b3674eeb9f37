from bottlefit.cli import console

console()
