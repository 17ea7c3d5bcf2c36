"""What crosses the wire between the server and a site, in one place.

`keys`: every message, config and record key; `spec`: the model spec the server sends; `wire`: a site
summary <-> the flat metrics that carry it; `outbound`: the allow-list every value a site sends must
pass. Both ends import these; neither end spells a key itself.
"""
