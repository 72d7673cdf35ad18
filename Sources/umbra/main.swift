print("umbra: not yet built")
