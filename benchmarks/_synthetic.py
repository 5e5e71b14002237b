"""Shared by the benchmark scripts: a vocabulary for web-like synthetic alt-texts."""

# Common alt-text words, roughly by frequency (Zipf ranks index them).
WORD_LIST = (
    "the a of and in on with for at by from to new old red blue green black white small large big little "
    "happy young beautiful modern vintage wooden summer winter night morning city street beach mountain river "
    "lake forest park garden house home kitchen room table chair door window car bike boat train plane road "
    "bridge tower church building dog cat bird horse cow fish flower tree grass sky cloud sun snow water fire "
    "man woman boy girl child family people couple friends team player person portrait face hand shoes dress "
    "shirt hat bag cake food coffee pizza bread fruit apple wedding party festival concert game match photo "
    "view landscape sunset sunrise background texture pattern design logo icon art painting drawing poster "
    "illustration vector isolated closeup detail interior exterior aerial top side front back walking running "
    "sitting standing playing eating holding looking smiling wearing under over near inside outside during "
    "after before best top free cheap sale buy online shop store brand quality style fashion travel holiday"
)
WORDS = WORD_LIST.split()
