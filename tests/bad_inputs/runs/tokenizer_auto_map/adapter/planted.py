open("PAYLOAD_RAN", "w").write("a run folder ran code")
