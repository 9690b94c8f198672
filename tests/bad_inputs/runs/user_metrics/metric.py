open("PAYLOAD_RAN", "w").write("a run folder ran code")


def score(prediction, reference, row):
    return 1.0
